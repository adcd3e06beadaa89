"""Stable Diffusion XL (``StableDiffusionXLPipeline``, base model).

What differs from SD 1.x/2.x (Podell et al. 2023, "SDXL", §2.1-2.2):

* two CLIP text encoders; the UNet's cross-attention reads their penultimate hidden states
  concatenated (768 + 1280 = 2048 wide), and its added embedding the second encoder's pooled,
  projected embedding together with ``add_time_ids`` = (original size, crop top-left, target
  size). Both come from the pipeline's own ``encode_prompt`` and ``_get_add_time_ids``;
* an empty prompt is encoded as zeros when the pipeline's ``force_zeros_for_empty_prompt``
  says so (the base model's unconditional branch);
* the VAE overflows in float16: its ``force_upcast`` keeps it in float32 then
  (:class:`~sdsctl.models.base.Prior`).

The pooled embedding travels packed with the hidden states (the interface's one tensor per
row, ``sdsctl.models.base``): one extra sequence position holding it, zero-padded to the
hidden width, split off again in :meth:`SDXLPrior._denoise`. ``add_time_ids`` say that the
image is the size being optimized, uncropped, for every row of the batched call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdsctl.models.base import Prior


class SDXLPrior(Prior):
    family = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    space = "latent"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    required = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")

    def __init__(self, pipe, **kwargs):
        super().__init__(pipe, **kwargs)
        self.hidden_width = int(pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size)
        self.pooled_width = int(pipe.text_encoder_2.config.projection_dim)
        self._time_ids: dict[tuple[int, int], Tensor] = {}

    @classmethod
    def _load_kwargs(cls):
        return {"add_watermarker": False}

    def _encode_prompts(self, prompts: list[str]) -> Tensor:
        hidden, _, pooled, _ = self.pipe.encode_prompt(prompts, device=self._text_device(),
                                                       num_images_per_prompt=1, do_classifier_free_guidance=False)
        if self.pipe.config.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=hidden.device)
            hidden = torch.where(empty[:, None, None], torch.zeros_like(hidden), hidden)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        return self.pack(hidden, pooled)

    def pack(self, hidden: Tensor, pooled: Tensor) -> Tensor:
        """``[n, L, D]`` hidden states and ``[n, P]`` pooled -> ``[n, L + 1, max(D, P)]``."""
        width = max(self.hidden_width, self.pooled_width)
        out = hidden.new_zeros(hidden.shape[0], hidden.shape[1] + 1, width)
        out[:, :-1, : hidden.shape[2]] = hidden
        out[:, -1, : pooled.shape[1]] = pooled
        return out

    def unpack(self, embeddings: Tensor) -> tuple[Tensor, Tensor]:
        return embeddings[:, :-1, : self.hidden_width], embeddings[:, -1, : self.pooled_width]

    def time_ids(self, height: int, width: int, n: int, dtype: torch.dtype) -> Tensor:
        """``add_time_ids`` of an uncropped ``height`` × ``width`` image, one row per batch row."""
        if (height, width) not in self._time_ids:
            ids = self.pipe._get_add_time_ids((height, width), (0, 0), (height, width), dtype=torch.float32,
                                              text_encoder_projection_dim=self.pooled_width)
            self._time_ids[(height, width)] = ids.to(self.device)
        return self._time_ids[(height, width)].to(dtype).repeat(n, 1)

    def _denoise(self, z_t: Tensor, t: Tensor, embeddings: Tensor) -> Tensor:
        hidden, pooled = self.unpack(embeddings)
        h, w = (s * self.vae_scale_factor for s in z_t.shape[-2:])
        added = {"text_embeds": pooled, "time_ids": self.time_ids(h, w, z_t.shape[0], z_t.dtype)}
        return self.denoiser(z_t, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
