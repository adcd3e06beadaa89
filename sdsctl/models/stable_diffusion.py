"""Stable Diffusion 1.x and 2.x (``StableDiffusionPipeline``): the family of the shapes prior.

A VAE latent space (4 channels, factor 8 for the published models), one CLIP text encoder
whose last hidden state conditions the UNet through cross-attention; ε- (1.x, 2.x-base) or
v-prediction (2.x at 768 px), converted to ε by :class:`~sdsctl.models.base.Prior`. Prompts
are encoded by the pipeline's own ``encode_prompt``. Default resolution: the UNet's
``sample_size`` × the VAE factor (512 for 1.x and 2.x-base, 768 for 2.x).
"""

from __future__ import annotations

from torch import Tensor

from sdsctl.models.base import Prior


class StableDiffusionPrior(Prior):
    family = "stable-diffusion"
    pipeline_class = "StableDiffusionPipeline"
    space = "latent"

    @classmethod
    def _load_kwargs(cls):
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def _encode_prompts(self, prompts: list[str]) -> Tensor:
        embeds, _ = self.pipe.encode_prompt(prompts, self._text_device(), 1, False)
        return embeds

    def _denoise(self, z_t: Tensor, t: Tensor, embeddings: Tensor) -> Tensor:
        return self.denoiser(z_t, t, encoder_hidden_states=embeddings).sample
