"""DeepFloyd IF, stage I (``IFPipeline``): a pixel-space cascade's 64 × 64 base model.

What differs from the latent families (Saharia et al. 2022, "Imagen", whose design IF follows):

* no VAE: the model denoises the image itself in [-1, 1], so ``space`` is ``"pixel"``,
  ``encode_images`` maps RGB [0, 1] to [-1, 1] and ``decode_latents`` back; only RGB
  parameterizations (``rgb-pixels``, ``rgb-hashgrid``) fit;
* a T5 encoder: its last hidden state over 77 tokens (the pipeline's fixed length, with
  the attention mask), by the pipeline's own ``encode_prompt`` (``clean_caption`` off: it
  needs ``bs4`` and ``ftfy``);
* the UNet predicts a learned variance too (``variance_type: learned_range``): its output
  has twice the image's channels, and the second half is dropped, as the pipeline does.

Only stage I is a prior here; the super-resolution stages condition on a low-resolution
image and are not text-to-image priors of their own.
"""

from __future__ import annotations

from torch import Tensor

from sdsctl.models.base import Prior


class IFPrior(Prior):
    family = "deepfloyd-if"
    pipeline_class = "IFPipeline"
    space = "pixel"
    required = ("unet", "text_encoder", "tokenizer", "scheduler")
    whole_word_vocab = False  # a sentencepiece vocabulary: no word</w> tokens
    prompt_tokens = 77  # IFPipeline.encode_prompt's max_length

    @classmethod
    def _load_kwargs(cls):
        return {"safety_checker": None, "feature_extractor": None, "watermarker": None,
                "requires_safety_checker": False}

    def _encode_prompts(self, prompts: list[str]) -> Tensor:
        embeds, _ = self.pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                            device=self._text_device(), clean_caption=False)
        return embeds

    def _denoise(self, z_t: Tensor, t: Tensor, embeddings: Tensor) -> Tensor:
        out = self.denoiser(z_t, t, encoder_hidden_states=embeddings).sample
        return out.split(z_t.shape[1], dim=1)[0]  # drop the learned-variance channels
