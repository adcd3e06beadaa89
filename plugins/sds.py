"""Guidance ``sds``: Score Distillation Sampling (DreamFusion, Poole et al. 2022, eq. 3).

    ∇θ L_SDS = E_{t,ε}[ w(t) (ε̂_φ(z_t; y, t) − ε) ∂z/∂θ ],
    ε̂_φ = ε(z_t; ∅) + s·(ε(z_t; y) − ε(z_t; ∅))      (``sdsctl.diffusion.cfg``)

The score returned is ε̂_φ − ε (the loop applies w(t)), and the denoised estimate
ẑ₀ = (z_t − √(1−ᾱ_t)·ε̂_φ)/√ᾱ_t that HiFA's image target decodes. The unconditional row uses
the recipe's ``negative_prompt`` when it is not empty (the empty prompt otherwise), as
diffusers' pipelines do. Both rows go through the UNet in one batched call: one model call
per step.

On a guidance-distilled model (``prior.guidance_distilled``: FLUX.1) one conditional row
already gives the guided prediction, so SDS is that row alone: ε̂_φ = ε(z_t; y, s) with the
scale fed to the model's guidance input where it has one (``guidance_embedded``: FLUX.1-dev)
-- half the rows, and the distribution the model was distilled on. ``check`` warns where
``guidance_scale`` or ``negative_prompt`` then mean nothing (schnell; any negative prompt).
On a flow-matching model ε̂_φ − ε = (1 − σ)(v̂ − (ε − x₀)) (``sdsctl.diffusion``): with the
``rfds`` weighting this is RFDS (Yang et al. 2024).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

import sdsctl
from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, StepTimes
from sdsctl.diffusion import cfg, eps_to_x0

if TYPE_CHECKING:  # torch is imported where it is used: loading the plugin stays light
    import torch


class SDS(Guidance):
    gives_denoised = True

    class Config(ComponentConfig):
        name: str = "sds"
        guidance_scale: float = Field(100.0, ge=0, description="CFG scale s (DreamFusion: 100)")

    @classmethod
    def check(cls, config, recipe, model) -> list[str]:
        if not model.guidance_distilled:
            return []
        notes, where = [], f"{model.pipeline} ({model.family})"
        if not model.guidance_embedded:
            notes.append(f"guidance_scale {config.guidance_scale:g} means nothing on {where}: it is guidance-distilled "
                         "and takes no scale, so SDS uses its one conditional prediction ε(z_t; y)")
        elif config.guidance_scale > 10:
            notes.append(f"guidance_scale {config.guidance_scale:g} is fed to the guidance input of {where} (one "
                         "conditional row, no CFG); distilled guidance is trained on small scales (FLUX.1-dev's "
                         "pipeline default: 3.5), a CFG-sized one is far outside them")
        if recipe.negative_prompt.strip():
            notes.append(f"negative_prompt means nothing for SDS on {where}: a guidance-distilled model has no "
                         "unconditional row to put it in")
        return notes

    def __init__(self, config, ctx):
        import torch

        super().__init__(config, ctx)
        cond = ctx.embeddings(ctx.recipe.prompt)
        self.distilled = ctx.prior.guidance_distilled
        if self.distilled:  # one row; the scale, if anywhere, is an input of the model
            self.embeddings = cond
            self.scale_input = config.guidance_scale if ctx.prior.guidance_embedded else None
        else:
            self.embeddings = torch.cat([ctx.embeddings(ctx.recipe.negative_prompt), cond])

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        import torch

        prior = self.ctx.prior
        eps = self.ctx.randn(z.shape, z.dtype)
        z_t = prior.add_noise(z, eps, times.t)
        if self.distilled:
            guided = prior.predict_noise(z_t, times.t, self.embeddings, guidance=self.scale_input)
            score = guided - eps
            return GuidanceOutput(score=score, norms={"denoise": score.norm()},
                                  timesteps={"t": times.t},
                                  denoised=lambda: eps_to_x0(guided, z_t, prior.alphas_cumprod[times.t]))
        e_uncond, e_cond = prior.predict_noise(torch.cat([z_t, z_t]), times.t, self.embeddings).chunk(2)
        classifier = self.config.guidance_scale * (e_cond - e_uncond)
        guided = cfg(e_uncond, e_cond, self.config.guidance_scale)
        return GuidanceOutput(
            score=guided - eps,
            norms={"classifier": classifier.norm(), "denoise": (e_uncond - eps).norm()},
            timesteps={"t": times.t},
            denoised=lambda: eps_to_x0(guided, z_t, prior.alphas_cumprod[times.t]),
        )


@sdsctl.hookimpl
def register_guidances(register):
    register("sds", SDS)
