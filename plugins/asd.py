"""Guidance ``asd``: Asynchronous Score Distillation (ScaleDreamer, Ma et al. 2024, arXiv 2407.02040).

VSD lowers the noise-prediction error on the current image by fine-tuning a LoRA; ASD notes
that the pretrained model's error is lower at earlier (noisier) timesteps of the reverse
process and uses its prediction at the shifted timestep t + Δt, with the *same* noise, in
place of the LoRA's estimate -- VSD's aim without its training loop::

    score = ε_CFG(x_t, t; y) − ε(x_{t+Δt}, t + Δt; y),    x_τ = √ᾱ_τ x_0 + √(1 − ᾱ_τ) ε (one ε)
    Δt    = ratio · (t − shift_t_min)  (× U[0, 1) when ``random``), clipped to the model's timesteps

(the loop applies w(t); Δt grows with t, as in the authors' code: ratio 0.1, random on). CFG's
unconditional row is the recipe's ``negative_prompt``. The three rows -- ∅ and y at t, y at
t + Δt -- go through the UNet in one batched call: one model call per step. The denoised
estimate is the CFG prediction's at t.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

import sdsctl
from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, StepTimes
from sdsctl.diffusion import cfg, eps_to_x0

if TYPE_CHECKING:  # torch is imported where it is used: loading the plugin stays light
    import torch


class ASD(Guidance):
    gives_denoised = True

    class Config(ComponentConfig):
        name: str = "asd"
        guidance_scale: float = Field(7.5, ge=0, description="CFG scale at t")
        ratio: float = Field(0.1, ge=0, description="Δt = ratio · (t − shift_t_min)")
        random: bool = Field(True, description="multiply Δt by a uniform draw in [0, 1) each step")
        shift_t_min: int = Field(20, ge=0, description="the timestep at which Δt is 0 (the schedule's t_min)")

    def __init__(self, config, ctx):
        import torch

        super().__init__(config, ctx)
        cond = ctx.embeddings(ctx.recipe.prompt)
        self.rows = torch.cat([ctx.embeddings(ctx.recipe.negative_prompt), cond, cond])

    def shifted(self, t: int) -> int:
        """t + Δt."""
        last = self.ctx.prior.num_train_timesteps - 1
        delta = min(max(self.config.ratio * (t - self.config.shift_t_min), 0.0), float(last - t))
        if self.config.random:
            delta *= self.ctx.rand()  # host-side: no device sync
        return min(max(t + int(delta), 1), last)

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        import torch

        prior, g, t = self.ctx.prior, self.ctx.generator, times.t
        t2 = self.shifted(t)
        eps = torch.randn(z.shape, generator=g, device=g.device, dtype=z.dtype)
        z_t, z_t2 = prior.add_noise(z, eps, t), prior.add_noise(z, eps, t2)
        steps = torch.tensor([t, t, t2], device=z.device).repeat_interleave(z.shape[0])
        e_uncond, e_cond, e_shifted = prior.predict_noise(torch.cat([z_t, z_t, z_t2]), steps, self.rows).chunk(3)
        guided = cfg(e_uncond, e_cond, self.config.guidance_scale)
        return GuidanceOutput(
            score=guided - e_shifted,
            norms={"classifier": (self.config.guidance_scale * (e_cond - e_uncond)).norm(),
                   "shift": (e_cond - e_shifted).norm()},
            timesteps={"t": t, "t_shifted": t2},
            denoised=lambda: eps_to_x0(guided, z_t, prior.alphas_cumprod[t]),
        )


@sdsctl.hookimpl
def register_guidances(register):
    register("asd", ASD)
