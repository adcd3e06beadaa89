"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``): a rectified-flow MMDiT.

What differs (Esser et al. 2024, "Scaling Rectified Flow Transformers", §2-§5):

* an ``SD3Transformer2DModel`` predicting the flow velocity v = ε − x₀ on
  x_σ = (1 − σ)x₀ + σε, converted to ε by :class:`~sdsctl.models.flow.FlowPrior`; its
  timestep input is σ·N;
* a static timestep shift, the scheduler configuration's ``shift`` (3.0 for the published
  models: σ = shift·σ_u / (1 + (shift − 1)·σ_u)), applied to t → σ by
  ``sdsctl.diffusion.flow_sigmas``; a configuration with ``use_dynamic_shifting`` gets μ
  from the pipeline's ``calculate_shift`` over (h/p)·(w/p) patches, as the pipeline does;
* three text encoders by the pipeline's own ``encode_prompt``: two CLIP encoders (their
  penultimate hidden states concatenated, padded to the T5 width; their pooled projections
  concatenated into ``pooled_projections``) and T5 (256 tokens), concatenated along the
  sequence. T5 may be left out (``model.without: [text_encoder_3]``, diffusers'
  ``text_encoder_3=None``): its part of the sequence is then zeros, as in the pipeline;
* latents of the VAE (16 channels), ``(z − shift_factor)·scaling_factor`` from its config;
  sizes divisible by the patch size; default resolution the transformer's ``sample_size``
  × 8 (1024).

Guidance: ordinary classifier-free guidance (SD3 was trained with dropped captions).
"""

from __future__ import annotations

from torch import Tensor

from sdsctl.models.flow import FlowPrior


class SD3Prior(FlowPrior):
    family = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    space = "latent"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    required = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    optional_text_encoders = ("text_encoder_3",)
    max_sequence_length = 256  # StableDiffusion3Pipeline's T5 length
    encoder_tokens = {"text_encoder_3": max_sequence_length}

    @classmethod
    def _latent_multiple(cls, denoiser_config: dict) -> int:
        return int(denoiser_config.get("patch_size", 2))

    def _image_seq_len(self, h: int, w: int) -> int:
        p = self.denoiser.config.patch_size
        return (h // p) * (w // p)

    def _mu(self, image_seq_len: int) -> float:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        c = self.scheduler.config  # the keys and defaults StableDiffusion3Pipeline.__call__ reads
        return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.16))

    def _encode_prompts(self, prompts: list[str]) -> Tensor:
        hidden, _, pooled, _ = self.pipe.encode_prompt(prompts, None, None, device=self._text_device(),
                                                       do_classifier_free_guidance=False,
                                                       max_sequence_length=self.max_sequence_length)
        return self.pack(hidden, pooled)

    def _velocity(self, x: Tensor, sigma: Tensor, embeddings: Tensor, guidance: float | None) -> Tensor:
        hidden, pooled = self.unpack(embeddings)
        timestep = sigma * self.num_train_timesteps  # what the pipeline feeds: the scheduler's σ·N
        return self.denoiser(hidden_states=x, timestep=timestep, encoder_hidden_states=hidden,
                             pooled_projections=pooled, return_dict=False)[0]
