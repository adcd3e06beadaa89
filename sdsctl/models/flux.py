"""FLUX.1 (``FluxPipeline``): dev (guidance-distilled, guidance embedding) and schnell.

What differs (Black Forest Labs 2024; the architecture of diffusers' ``FluxTransformer2DModel``):

* a rectified-flow transformer predicting v = ε − x₀ on x_σ = (1 − σ)x₀ + σε (converted to
  ε by :class:`~sdsctl.models.flow.FlowPrior`); its timestep input is σ itself;
* latents packed in 2 × 2 patches (``[n, C, h, w]`` → ``[n, h/2·w/2, 4C]``) with image
  position ids, and text position ids beside the T5 sequence -- the pipeline's own
  ``_pack_latents``, ``_unpack_latents``, ``_prepare_latent_image_ids`` and the ``text_ids``
  its ``encode_prompt`` returns; latent sizes even;
* a resolution-dependent timestep shift when the scheduler says ``use_dynamic_shifting``
  (dev): μ = ``calculate_shift``(h/2·w/2, base/max_image_seq_len, base/max_shift) from the
  scheduler configuration, as ``FluxPipeline.__call__`` computes it, σ = the scheduler's
  ``time_shift(μ, 1, σ_u)`` (``sdsctl.diffusion.flow_sigmas``); schnell: no shift;
* T5 hidden states (512 tokens for dev, 256 for schnell, as its model card says) as the
  sequence, CLIP's pooled output as ``pooled_projections``, by the pipeline's
  ``encode_prompt``;
* the VAE's ``scaling_factor`` and ``shift_factor`` from its config; default resolution
  ``FluxPipeline.default_sample_size`` (128) × 8 = 1024.

**Guidance.** Both are guidance-distilled (``guidance_distilled``): one conditional row gives
a guided prediction. dev takes the scale as an input (``guidance_embeds``:
``guidance_embedded``), fed by ``predict_noise(..., guidance=s)``; rows without a scale
(the unconditional and negative rows of "true CFG") get the embedding at 1, i.e. no
distilled guidance. schnell has no guidance input and was not trained for CFG.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdsctl.models.flow import FlowPrior


class FluxPrior(FlowPrior):
    family = "flux"
    pipeline_class = "FluxPipeline"
    space = "latent"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    required = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
    guidance_distilled = True
    default_sample_size = 128  # FluxPipeline.default_sample_size: the transformer's config has none
    true_cfg_guidance = 1.0  # dev's guidance embedding on rows fed without a scale

    def __init__(self, pipe, **kwargs):
        self.guidance_embedded = bool(pipe.transformer.config.guidance_embeds)
        self.max_sequence_length = 512 if self.guidance_embedded else 256
        super().__init__(pipe, **kwargs)
        self._text_ids: Tensor | None = None
        self._image_ids: dict[tuple[int, int], Tensor] = {}

    @classmethod
    def _describe(cls, folder, source, variant, without=()):
        import dataclasses

        from sdsctl.models.sources import read_json

        info = super()._describe(folder, source, variant, without)
        embedded = bool(read_json(folder / "transformer" / "config.json").get("guidance_embeds", False))
        encoders = tuple({**e, "max_tokens": 512 if embedded else 256} if e["name"] == "text_encoder_2" else e
                         for e in info.text_encoders)
        return dataclasses.replace(info, guidance_embedded=embedded, text_encoders=encoders)

    @classmethod
    def _latent_size(cls, denoiser_config) -> int:
        return cls.default_sample_size

    @classmethod
    def _latent_multiple(cls, denoiser_config: dict) -> int:
        return 2  # 2 × 2 packing

    def _image_seq_len(self, h: int, w: int) -> int:
        return (h // 2) * (w // 2)  # the packed sequence's length, as FluxPipeline reads latents.shape[1]

    def _mu(self, image_seq_len: int) -> float:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = self.scheduler.config  # the keys and defaults FluxPipeline.__call__ reads
        return calculate_shift(image_seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                               c.get("base_shift", 0.5), c.get("max_shift", 1.15))

    def _encode_prompts(self, prompts: list[str]) -> Tensor:
        hidden, pooled, text_ids = self.pipe.encode_prompt(prompts, device=self._text_device(),
                                                           max_sequence_length=self.max_sequence_length)
        self._text_ids = text_ids.to(self.device)
        return self.pack(hidden, pooled)

    # -- packing, by the pipeline's own helpers
    def pack_latents(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return self.pipe._pack_latents(x, n, c, h, w)

    def unpack_latents(self, packed: Tensor, h: int, w: int) -> Tensor:
        f = self.vae_scale_factor
        return self.pipe._unpack_latents(packed, h * f, w * f, f)

    def image_ids(self, h: int, w: int, dtype: torch.dtype) -> Tensor:
        if (h, w) not in self._image_ids:
            self._image_ids[(h, w)] = self.pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device, torch.float32)
        return self._image_ids[(h, w)].to(dtype)

    def _velocity(self, x: Tensor, sigma: Tensor, embeddings: Tensor, guidance: float | None) -> Tensor:
        hidden, pooled = self.unpack(embeddings)
        n, _, h, w = x.shape
        g = None
        if self.guidance_embedded:
            scale = self.true_cfg_guidance if guidance is None else guidance
            g = torch.full((n,), float(scale), device=x.device, dtype=torch.float32)
        text_ids = self._text_ids  # from encode_prompt: one per token, the same for every prompt
        packed = self.denoiser(hidden_states=self.pack_latents(x), timestep=sigma.to(x.dtype), guidance=g,
                               pooled_projections=pooled, encoder_hidden_states=hidden,
                               txt_ids=text_ids.to(x.dtype), img_ids=self.image_ids(h, w, x.dtype),
                               return_dict=False)[0]
        return self.unpack_latents(packed, h, w)
