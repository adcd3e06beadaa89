"""Guidance ``sds``: Score Distillation Sampling (DreamFusion, Poole et al. 2022, eq. 3).

    ∇θ L_SDS = E_{t,ε}[ w(t) (ε̂_φ(z_t; y, t) − ε) ∂z/∂θ ],
    ε̂_φ = ε(z_t; ∅) + s·(ε(z_t; y) − ε(z_t; ∅))      (``sdsctl.diffusion.cfg``)

The score returned is ε̂_φ − ε (the loop applies w(t)), and the denoised estimate
ẑ₀ = (z_t − √(1−ᾱ_t)·ε̂_φ)/√ᾱ_t that HiFA's image target decodes. The unconditional row uses
the recipe's ``negative_prompt`` when it is not empty (the empty prompt otherwise), as
diffusers' pipelines do. Both rows go through the UNet in one batched call: one model call
per step.
"""

from __future__ import annotations

import torch
from pydantic import Field

import sdsctl
from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, StepTimes
from sdsctl.diffusion import cfg, eps_to_x0


class SDS(Guidance):
    gives_denoised = True

    class Config(ComponentConfig):
        name: str = "sds"
        guidance_scale: float = Field(100.0, ge=0, description="CFG scale s (DreamFusion: 100)")

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        uncond = ctx.embeddings(ctx.recipe.negative_prompt)
        cond = ctx.embeddings(ctx.recipe.prompt)
        self.embeddings = torch.cat([uncond, cond])

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        prior, g = self.ctx.prior, self.ctx.generator
        eps = torch.randn(z.shape, generator=g, device=g.device, dtype=z.dtype)
        z_t = prior.add_noise(z, eps, times.t)
        e_uncond, e_cond = prior.predict_noise(torch.cat([z_t, z_t]), times.t, self.embeddings).chunk(2)
        classifier = self.config.guidance_scale * (e_cond - e_uncond)
        guided = cfg(e_uncond, e_cond, self.config.guidance_scale)
        return GuidanceOutput(
            score=guided - eps,
            norms={"classifier": classifier.norm(), "denoise": (e_uncond - eps).norm()},
            timesteps={"t": times.t},
            denoised=eps_to_x0(guided, z_t, prior.alphas_cumprod[times.t]),
        )


@sdsctl.hookimpl
def register_guidances(register):
    register("sds", SDS)
