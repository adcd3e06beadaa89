"""Guidance ``nfsd``: Noise-Free Score Distillation (Katzir et al. 2023, arXiv 2310.17590).

NFSD splits the CFG score into a classifier term and a domain-correction term and drops
the sampled noise that makes SDS over-smooth::

    δ_C = ε(z_t; y) − ε(z_t; ∅)                                    (classifier)
    δ_D = ε(z_t; ∅)                         if t < 200             (correction)
        = ε(z_t; ∅) − ε(z_t; y_neg)         otherwise
    score = s · δ_C + correction_scale · δ_D

No sampled noise ε is subtracted. All rows go through the UNet in one batched call
(two rows below t = 200, three above). The study's first cuisine scales δ_D by 0.1.
"""

from __future__ import annotations

import torch
from pydantic import Field

import sdsctl
from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, StepTimes

#: The negative prompt of the NFSD paper: its words are part of the shapes world's vocabulary.
NFSD_NEGATIVE_PROMPT = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
)


class NFSDConfig(ComponentConfig):
    name: str = "nfsd"
    guidance_scale: float = Field(7.5, ge=0, description="scale s of the classifier term")
    correction_scale: float = Field(1.0, ge=0, description="scale of the correction term δ_D")
    negative_prompt: str = Field(NFSD_NEGATIVE_PROMPT, description="y_neg of the correction term for t >= threshold")
    threshold: int = Field(200, ge=0, description="below this timestep δ_D = ε(z_t; ∅)")


class NFSD(Guidance):
    Config = NFSDConfig

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.uncond = ctx.embeddings("")
        self.cond = ctx.embeddings(ctx.recipe.prompt)
        self.negative = ctx.embeddings(config.negative_prompt)

    def noised(self, z: torch.Tensor, t: int) -> torch.Tensor:
        g = self.ctx.generator
        eps = torch.randn(z.shape, generator=g, device=g.device, dtype=z.dtype)
        return self.ctx.prior.add_noise(z, eps, t)

    def terms(self, z_t: torch.Tensor, t: int, correction: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(δ_C, δ_D) at one timestep, from one batched UNet call (δ_D None when not asked for)."""
        large = t >= self.config.threshold
        rows = [self.uncond, self.cond] + ([self.negative] if large and correction else [])
        preds = self.ctx.prior.predict_noise(torch.cat([z_t] * len(rows)), t, torch.cat(rows)).chunk(len(rows))
        classifier = preds[1] - preds[0]
        if not correction:
            return classifier, None
        return classifier, (preds[0] - preds[2] if large else preds[0])

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        classifier, correction = self.terms(self.noised(z, times.t), times.t)
        c = self.config.guidance_scale * classifier
        d = self.config.correction_scale * correction
        return GuidanceOutput(score=c + d, norms={"classifier": c.norm(), "correction": d.norm()},
                              timesteps={"t": times.t})


@sdsctl.hookimpl
def register_guidances(register):
    register("nfsd", NFSD)
