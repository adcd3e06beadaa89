"""Guidance ``ism``: Interval Score Matching (LucidDreamer, Liang et al. 2023, arXiv 2311.11284, Alg. 1).

SDS compares the prediction at x_t with the random noise that made x_t; ISM replaces that noise
by a deterministic, consistent target. The current latent x_0 is DDIM-inverted with the
unconditional prediction (the empty prompt ∅) to x_s, s = t − δ_T, in ``inversion_steps``
evenly spaced steps, then one more inversion step takes x_s to x_t::

    x_t   = √ᾱ_t · x̂_0(x_s) + √(1 − ᾱ_t) · ε(x_s, s; ∅),   x̂_0(x_s) = (x_s − √(1 − ᾱ_s) ε(x_s, s; ∅)) / √ᾱ_s
    score = ε_CFG(x_t, t; y) − ε(x_s, s; ∅),               ε_CFG = ε(∅') + w·(ε(y) − ε(∅'))

(eq. 17; the loop applies w(t)). ∅' is the recipe's ``negative_prompt`` (CFG's unconditional
row, as for SDS); the inversion uses the empty prompt, as the paper does. Each inversion step
evaluates ε at its source timestep; x_0 is taken as the sample at timestep 0.

Zero inversion steps is the documented special case: no path, s = 0 and x_s = x_0, so
x_t = √ᾱ_t · x̂_0(x_0) + √(1 − ᾱ_t) · ε(x_0, 0; ∅) and score = ε_CFG(x_t, t; y) − ε(x_0, 0; ∅) --
SDS with its random noise replaced by the prior's own noise estimate at the clean latent. The
same holds whenever t ≤ δ_T.

Model calls per step: ``inversion_steps`` + 2, one after another (each inversion step needs the
one before; ε(x_s, s; ∅) makes x_t; the CFG pair at t is one batched call of two rows). The
denoised estimate is the CFG prediction's at t.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

import sdsctl
from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, StepTimes
from sdsctl.diffusion import cfg, ddim_invert, ddim_step, eps_to_x0, even_path

if TYPE_CHECKING:  # torch is imported where it is used: loading the plugin stays light
    import torch


class ISM(Guidance):
    gives_denoised = True

    class Config(ComponentConfig):
        name: str = "ism"
        guidance_scale: float = Field(7.5, ge=0, description="CFG scale w at x_t (LucidDreamer: 7.5)")
        interval: int = Field(50, ge=1, description="δ_T: s = t − δ_T")
        inversion_steps: int = Field(3, ge=0, description="DDIM inversion steps from x_0 to x_s (0: x_s = x_0, s = 0)")

    def __init__(self, config, ctx):
        import torch

        super().__init__(config, ctx)
        self.null = ctx.embeddings("")
        self.pair = torch.cat([ctx.embeddings(ctx.recipe.negative_prompt), ctx.embeddings(ctx.recipe.prompt)])

    def null_eps(self, z: torch.Tensor, t: int) -> torch.Tensor:
        return self.ctx.prior.predict_noise(z, t, self.null)

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        import torch

        prior, cfg_ = self.ctx.prior, self.config
        t = times.t
        s = max(t - cfg_.interval, 0) if cfg_.inversion_steps > 0 else 0
        x_s = z
        if s > 0:
            x_s, _ = ddim_invert(self.null_eps, z, even_path(0, s, cfg_.inversion_steps), prior.alphas_cumprod)
        eps_s = self.null_eps(x_s, s)
        a = prior.alphas_cumprod
        x_t = ddim_step(eps_s, x_s, a[s], a[t])
        e_uncond, e_cond = prior.predict_noise(torch.cat([x_t, x_t]), t, self.pair).chunk(2)
        guided = cfg(e_uncond, e_cond, cfg_.guidance_scale)
        return GuidanceOutput(
            score=guided - eps_s,
            norms={"classifier": (cfg_.guidance_scale * (e_cond - e_uncond)).norm(),
                   "interval": (e_uncond - eps_s).norm()},
            timesteps={"t": t, "s": s},
            denoised=lambda: eps_to_x0(guided, x_t, a[t]),
        )


@sdsctl.hookimpl
def register_guidances(register):
    register("ism", ISM)
