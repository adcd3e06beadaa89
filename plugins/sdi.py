"""Guidance ``sdi``: Score Distillation via Inversion (Lukoianov et al. 2024, "Score Distillation
via Reparametrized DDIM", arXiv 2405.15891).

SDS draws the noise of x_t at random, so consecutive steps pull towards different samples and
the result is over-smoothed. SDI takes the noisy latent from DDIM-inverting the current latent
x_0 instead, and fits x_0 to the denoised estimate there::

    x_τ'  = DDIM-inversion of x_0 to τ' = t + δ (CFG at ``inversion_guidance_scale``, η noise)
    ε̃     = (x_τ' − √ᾱ_t x_0) / √(1 − ᾱ_t)
    score = ε_CFG(x_τ', t; y) − ε̃,              ε_CFG = ε(∅) + s·(ε(y) − ε(∅))

With the weighting √((1 − ᾱ_t)/ᾱ_t) (``sigma-over-alpha``) the step is exactly
x_0 − x̂_0(x_τ', t): threestudio's loss ``0.5·‖x_0 − sg(x̂_0)‖²``.

Reference: threestudio-project/threestudio@28d9d80 (added by the paper's first author),
``threestudio/models/guidance/stable_diffusion_sdi_guidance.py`` (``predict_noise``,
``ddim_inversion_step``, ``get_inversion_timesteps``, ``invert_noise``, ``compute_grad_sdi``,
``update_step``) and ``configs/sdi.yaml``; ``tests/test_references.py`` checks a step against it.

* **CFG convention.** threestudio writes its scale s' as ε_y + s'·(ε_y − ε_∅); sdsctl's scales
  are in the diffusers form ε_∅ + s·(ε_y − ε_∅), so s = s' + 1. ``sdi.yaml``'s s' = 7.5 is
  ``guidance_scale: 8.5`` here, its ``inversion_guidance_scale`` −7.5 is −6.5 here.
* **Inversion path.** ``inversion_steps`` n: the model's "leading" timesteps k·T/n + offset
  (``steps_offset`` of its scheduler) below t, preceded by one step from offset − T/n (ᾱ_0 there:
  SD's ``set_alpha_to_one`` is false) and followed by a last step to t + δ, δ ~ U{0, …, T/n − 1}
  (``overshoot``), capped at T − 1. threestudio evaluates that first step's prediction at the
  negative timestep offset − T/n; sdsctl evaluates it at 0 (timesteps below 0 are outside the
  model; flow models could not index them).
* **η.** After every inversion step η·σ·N(0, I) is added, σ² = (1 − ᾱ_a)/(1 − ᾱ_b)·(1 − ᾱ_b/ᾱ_a)
  from step a to b (diffusers' ``DDIMScheduler._get_variance(b, a)``); ``inversion_eta`` 0.3.
* **Timesteps and weighting** are the recipe's: ``sdi.yaml`` anneals t linearly from 0.98 T to
  0.25 T (schedule ``linear``) and weights by ``sigma-over-alpha``.

CFG's unconditional row is the recipe's ``negative_prompt`` in every pair. Model calls per step:
the path's steps + 1, one after another (two rows each). The denoised estimate is the CFG
prediction's at t.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

import sdsctl
from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, StepTimes
from sdsctl.diffusion import cfg, ddim_step, eps_to_x0

if TYPE_CHECKING:  # torch is imported where it is used: loading the plugin stays light
    import torch


class SDI(Guidance):
    gives_denoised = True
    unconditional_rows = True

    class Config(ComponentConfig):
        name: str = "sdi"
        guidance_scale: float = Field(8.5, description="CFG scale s at t (threestudio: 7.5 in its form)")
        inversion_steps: int = Field(10, ge=1, description="n: the inversion's timestep spacing is T/n")
        inversion_guidance_scale: float = Field(
            -6.5, description="CFG scale of the inversion's predictions (threestudio's -7.5 in its form)")
        inversion_eta: float = Field(0.3, ge=0, description="η: fresh noise added after each inversion step")
        overshoot: bool = Field(True, description="invert past t by δ ~ U{0, ..., T/n − 1}")

    def __init__(self, config, ctx):
        import torch

        super().__init__(config, ctx)
        self.pair = torch.cat([ctx.embeddings(ctx.recipe.negative_prompt), ctx.embeddings(ctx.recipe.prompt)])
        scheduler_config = getattr(ctx.prior.scheduler, "config", {})
        self.offset = int(scheduler_config.get("steps_offset", 0) or 0)

    def cfg_eps(self, z: torch.Tensor, t: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(CFG prediction, ε(∅), ε(y)) at (z, t): one call of two rows."""
        import torch

        e_uncond, e_cond = self.ctx.prior.predict_noise(torch.cat([z, z]), t, self.pair).chunk(2)
        return cfg(e_uncond, e_cond, scale), e_uncond, e_cond

    def path(self, t: int) -> list[int]:
        """The inversion's timesteps, from offset − T/n (below 0) to t + δ."""
        last_t = self.ctx.prior.num_train_timesteps - 1
        stride = self.ctx.prior.num_train_timesteps // self.config.inversion_steps
        below = [k * stride + self.offset for k in range(self.config.inversion_steps) if k * stride + self.offset < t]
        delta = int(self.ctx.rand() * stride) if self.config.overshoot else 0  # host-side: no device sync
        return [self.offset - stride, *below, min(t + delta, last_t)]

    def invert(self, z: torch.Tensor, path: list[int]) -> torch.Tensor:

        a, cfg_ = self.ctx.prior.alphas_cumprod, self.config
        x = z
        for src, dst in zip(path, path[1:]):
            a_src, a_dst = a[max(src, 0)], a[dst]
            x = ddim_step(self.cfg_eps(x, max(src, 0), cfg_.inversion_guidance_scale)[0], x, a_src, a_dst)
            if cfg_.inversion_eta > 0:
                sigma = ((1 - a_src) / (1 - a_dst) * (1 - a_dst / a_src)).sqrt()
                x = x + cfg_.inversion_eta * sigma * self.ctx.randn(x.shape, x.dtype)
        return x

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        a, t = self.ctx.prior.alphas_cumprod, times.t
        path = self.path(t)
        x_inv = self.invert(z, path)
        noise = (x_inv - a[t].sqrt() * z) / (1 - a[t]).sqrt()
        guided, e_uncond, e_cond = self.cfg_eps(x_inv, t, self.config.guidance_scale)
        return GuidanceOutput(
            score=guided - noise,
            norms={"classifier": (self.config.guidance_scale * (e_cond - e_uncond)).norm(),
                   "denoise": (e_uncond - noise).norm(),
                   "noise": noise.norm()},
            timesteps={"t": t, "t_inverted": path[-1]},
            denoised=lambda: eps_to_x0(guided, x_inv, a[t]),
        )


@sdsctl.hookimpl
def register_guidances(register):
    register("sdi", SDI)
