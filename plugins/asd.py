"""Guidance ``asd``: Asynchronous Score Distillation (ScaleDreamer, Ma et al. 2024, arXiv 2407.02040).

VSD lowers the noise-prediction error on the current image by fine-tuning a LoRA; ASD notes
that the pretrained model's error is lower at earlier (noisier) timesteps of the reverse
process and uses its prediction at the shifted timestep t + Δt, with the *same* noise, in
place of the LoRA's estimate -- VSD's aim without its training loop::

    score = ε_CFG(x_t, t; y) − ε(x_{t+Δt}, t + Δt; y),    x_τ = √ᾱ_τ x_0 + √(1 − ᾱ_τ) ε (one ε)
    Δt    = ratio · (t − t_min), clipped to [0, T − 1 − t] (× U[0, 1) when ``random``), t + Δt in [1, T − 1]

(the loop applies w(t), ScaleDreamer's ``sds`` weighting 1 − ᾱ_t at the unshifted t). t_min is
the lower end of the range the schedule drew t from at this step (``StepTimes.t_min``:
ScaleDreamer's ``min_step``, which its configs anneal from 500 to 20), or ``shift_t_min`` when
set. CFG's unconditional row is the recipe's ``negative_prompt``; the shifted row is
conditional only.

Reference: theEricMa/ScaleDreamer@23f433f,
``threestudio/models/guidance/stable_diffusion_asd_guidance.py`` (``get_t_plus`` L294–316, the
shared noise L227–246, ``get_eps`` L376–426, the gradient L261–283) and
``configs/single-prompt_benchmark/asd_sd_nerf.yaml`` (CFG 7.5, ``plus_ratio`` 0.1,
``plus_random`` true, t range [500, 980] → [20, 500] over the run: ``recipes/asd.yaml``);
``tests/test_references.py`` checks a step against it.

The three rows -- ∅ and y at t, y at t + Δt -- go through the UNet in one batched call: one
model call per step. The denoised estimate is the CFG prediction's at t.
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
    unconditional_rows = True

    class Config(ComponentConfig):
        name: str = "asd"
        guidance_scale: float = Field(7.5, ge=0, description="CFG scale at t")
        ratio: float = Field(0.1, ge=0, description="Δt = ratio · (t − t_min)")
        random: bool = Field(True, description="multiply Δt by a uniform draw in [0, 1) each step")
        shift_t_min: int | None = Field(
            None, ge=0, description="the timestep at which Δt is 0; default: the schedule's t_min at the step")

    def __init__(self, config, ctx):
        import torch

        super().__init__(config, ctx)
        cond = ctx.embeddings(ctx.recipe.prompt)
        self.rows = torch.cat([ctx.embeddings(ctx.recipe.negative_prompt), cond, cond])

    def shifted(self, t: int, t_min: int | None = None) -> int:
        """t + Δt, Δt measured from ``shift_t_min`` or else ``t_min`` (the schedule's; 0 without one)."""
        last = self.ctx.prior.num_train_timesteps - 1
        origin = self.config.shift_t_min if self.config.shift_t_min is not None else (t_min or 0)
        delta = min(max(self.config.ratio * (t - origin), 0.0), float(last - t))
        if self.config.random:
            delta *= self.ctx.rand()  # host-side: no device sync
        return min(max(t + int(delta), 1), last)

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        import torch

        prior, t = self.ctx.prior, times.t
        t2 = self.shifted(t, times.t_min)
        eps = self.ctx.randn(z.shape, z.dtype)
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
