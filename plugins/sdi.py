"""Guidance ``sdi``: Score Distillation via Inversion (Lukoianov et al. 2024, "Score Distillation
via Reparametrized DDIM", arXiv 2405.15891).

SDS draws the noise of x_t at random, so consecutive steps pull towards different samples and
the result is over-smoothed. SDI takes x_t from DDIM-inverting the current latent x_0 to t
instead (``inversion_steps`` evenly spaced steps, each with the CFG prediction at scale
``inversion_guidance_scale``; threestudio's default −7.5), and the noise that x_t implies::

    x_t   = DDIM-inversion of x_0 to t,     ε̃ = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t)
    score = ε_CFG(x_t, t; y) − ε̃,           ε_CFG = ε(∅) + s·(ε(y) − ε(∅))

(the loop applies w(t)). ∅ is the recipe's ``negative_prompt`` in every CFG pair. The
inversion is deterministic (η = 0): the paper's and threestudio's optional fresh noise per
inversion step is not implemented. Model calls per step: ``inversion_steps`` + 1, one after
another (two rows each). The denoised estimate is the CFG prediction's at t.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

import sdsctl
from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, StepTimes
from sdsctl.diffusion import cfg, ddim_invert, eps_to_x0, even_path

if TYPE_CHECKING:  # torch is imported where it is used: loading the plugin stays light
    import torch


class SDI(Guidance):
    gives_denoised = True

    class Config(ComponentConfig):
        name: str = "sdi"
        guidance_scale: float = Field(7.5, description="CFG scale s at x_t")
        inversion_steps: int = Field(10, ge=1, description="DDIM inversion steps from x_0 to x_t")
        inversion_guidance_scale: float = Field(
            -7.5, description="CFG scale of the inversion's predictions (threestudio: -7.5)")

    def __init__(self, config, ctx):
        import torch

        super().__init__(config, ctx)
        self.pair = torch.cat([ctx.embeddings(ctx.recipe.negative_prompt), ctx.embeddings(ctx.recipe.prompt)])

    def cfg_eps(self, z: torch.Tensor, t: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CFG prediction, ε(∅), ε(y)) at (z, t): one call of two rows."""
        import torch

        e_uncond, e_cond = self.ctx.prior.predict_noise(torch.cat([z, z]), t, self.pair).chunk(2)
        return cfg(e_uncond, e_cond, scale), e_uncond, e_cond

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        prior, t = self.ctx.prior, times.t
        a = prior.alphas_cumprod
        scale = self.config.inversion_guidance_scale
        x_t, _ = ddim_invert(lambda x, tau: self.cfg_eps(x, tau, scale)[0], z,
                             even_path(0, t, self.config.inversion_steps), a)
        noise = (x_t - a[t].sqrt() * z) / (1 - a[t]).sqrt()
        guided, e_uncond, e_cond = self.cfg_eps(x_t, t, self.config.guidance_scale)
        return GuidanceOutput(
            score=guided - noise,
            norms={"classifier": (self.config.guidance_scale * (e_cond - e_uncond)).norm(),
                   "denoise": (e_uncond - noise).norm(),
                   "noise": noise.norm()},
            timesteps={"t": t},
            denoised=lambda: eps_to_x0(guided, x_t, a[t]),
        )


@sdsctl.hookimpl
def register_guidances(register):
    register("sdi", SDI)
