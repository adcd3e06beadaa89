"""Guidance ``nfsd``: Noise-Free Score Distillation (Katzir et al. 2023, arXiv 2310.17590).

NFSD splits the CFG score into a classifier term and a domain-correction term and drops
the sampled noise that makes SDS over-smooth::

    δ_C = ε(z_t; y) − ε(z_t; ∅)                                    (classifier)
    δ_D = ε(z_t; ∅)                         if t < 200             (correction)
        = ε(z_t; ∅) − ε(z_t; y_neg)         otherwise
    score = s · δ_C + correction_scale · δ_D

No sampled noise ε is subtracted. y_neg is the recipe's ``negative_prompt`` (the one meaning
it has for every guidance: what the image should not look like; SDS and VSD put it in CFG's
unconditional row); the bundled NFSD recipes set the paper's, :data:`NFSD_NEGATIVE_PROMPT`.
All rows go through the UNet in one batched call: one model call per step (two rows below
t = 200, three above). The study's first cuisine scales δ_D by 0.1. The denoised estimate
handed to HiFA's image target is that of the CFG prediction ε(∅) + s·δ_C at t.

On a guidance-distilled model (FLUX.1) the rows are the same, run as "true CFG" rows (no
guidance input: FLUX.1-dev's embedding at 1): ``check`` says so, since they cost a model
row each where the model alone needs one and are off its training distribution.
"""

from __future__ import annotations

import torch
from pydantic import Field

import sdsctl
from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, InvalidConfig, StepTimes
from sdsctl.diffusion import eps_to_x0, true_cfg_note

#: The negative prompt of the NFSD paper (the bundled NFSD recipes' ``negative_prompt``): its
#: words are part of the shapes world's vocabulary.
NFSD_NEGATIVE_PROMPT = (
    "unrealistic, blurry, low quality, out of focus, ugly, low contrast, dull, dark, low-resolution, gloomy"
)


class NFSDConfig(ComponentConfig):
    name: str = "nfsd"
    guidance_scale: float = Field(7.5, ge=0, description="scale s of the classifier term")
    correction_scale: float = Field(1.0, ge=0, description="scale of the correction term δ_D")
    threshold: int = Field(200, ge=0, description="below this timestep δ_D = ε(z_t; ∅)")


class NFSD(Guidance):
    Config = NFSDConfig
    gives_denoised = True

    @classmethod
    def check(cls, config, recipe, model) -> list[str]:
        cls.check_negative_prompt(config, recipe, model)
        return [n for n in [true_cfg_note("NFSD", model)] if n]

    @classmethod
    def check_negative_prompt(cls, config, recipe, model) -> None:
        if not recipe.negative_prompt.strip() and config.threshold < model.num_train_timesteps:
            raise InvalidConfig(
                f"the recipe's negative_prompt is empty, so NFSD's correction ε(∅) − ε(y_neg) is zero for "
                f"t >= {config.threshold}. Set negative_prompt (the NFSD paper's: {NFSD_NEGATIVE_PROMPT!r}), "
                f"or threshold: {model.num_train_timesteps} to use ε(∅) at every t")

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.uncond = ctx.embeddings("")
        self.cond = ctx.embeddings(ctx.recipe.prompt)
        self.negative = ctx.embeddings(ctx.recipe.negative_prompt)

    def noised(self, z: torch.Tensor, t: int) -> torch.Tensor:
        g = self.ctx.generator
        eps = torch.randn(z.shape, generator=g, device=g.device, dtype=z.dtype)
        return self.ctx.prior.add_noise(z, eps, t)

    def terms(self, z_t: torch.Tensor, t: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ε(z_t; ∅), δ_C, δ_D) at one timestep, from one batched UNet call."""
        large = t >= self.config.threshold
        rows = [self.uncond, self.cond] + ([self.negative] if large else [])
        preds = self.ctx.prior.predict_noise(torch.cat([z_t] * len(rows)), t, torch.cat(rows)).chunk(len(rows))
        return preds[0], preds[1] - preds[0], (preds[0] - preds[2] if large else preds[0])

    def nfsd(self, z: torch.Tensor, t: int, correction_scale: float) -> GuidanceOutput:
        """s·δ_C + correction_scale·δ_D at t, with the CFG prediction's denoised estimate."""
        z_t = self.noised(z, t)
        uncond, classifier, correction = self.terms(z_t, t)
        c = self.config.guidance_scale * classifier
        d = correction_scale * correction
        return GuidanceOutput(score=c + d, norms={"classifier": c.norm(), "correction": d.norm()},
                              timesteps={"t": t},
                              denoised=eps_to_x0(uncond + c, z_t, self.ctx.prior.alphas_cumprod[t]))

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        return self.nfsd(z, times.t, self.config.correction_scale)


@sdsctl.hookimpl
def register_guidances(register):
    register("nfsd", NFSD)
