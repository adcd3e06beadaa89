"""Guidance ``ism``: Interval Score Matching (LucidDreamer, Liang et al. 2023, arXiv 2311.11284, Alg. 1).

SDS compares the prediction at x_t with the random noise that made x_t; ISM replaces that noise
by a deterministic, consistent target. The current latent x_0, noised to the first timestep of
the inversion path, is DDIM-inverted with the unconditional prediction (the empty prompt ∅)
to x_s, s = t − δ_T, then one more inversion step takes x_s to x_t::

    x_a   = √ᾱ_a · x_0 + √(1 − ᾱ_a) · ε,     ε ~ N(0, I) + 0.1 · N(0, I) per channel (offset noise)
    x_s   = DDIM-inversion of x_a along a, a + stride, ..., s  (ε(x_τ, τ; ∅) at each source τ)
    x_t   = √ᾱ_t · x̂_0(x_s) + √(1 − ᾱ_t) · ε(x_s, s; ∅)
    score = ε_CFG(x_t, t; y) − ε(x_s, s; ∅),      ε_CFG = ε(∅') + w·(ε(y) − ε(∅'))

(eq. 17). The loop multiplies by w(t); LucidDreamer's is √((1 − ᾱ_t)/ᾱ_t), the weighting
``sigma-over-alpha`` of ``recipes/ism.yaml``. ∅' is the recipe's ``negative_prompt`` (CFG's
unconditional row); the inversion uses the empty prompt (LucidDreamer's ``inverse_text``).

Reference: EnVision-Research/LucidDreamer@2ecf093, ``guidance/sd_utils.py`` (``train_step``
L346–466, ``add_noise_with_cfg`` L159–215) with ``arguments/__init__.py``'s defaults:

* δ_T (``interval``) anneals from ``delta_t_start`` 100 to ``delta_t`` 80 over the first
  ``warmup_iter`` 1500 of 5000 iterations (a :class:`~sdsctl.components.Ramp` ``{start: 100,
  end: 80, until: 0.3}``; its shipped configs set δ_T between 25 and 80);
* the inversion to s starts at a = max(s − stride · steps, 0) (``xs_delta_t`` 200,
  ``xs_inv_steps`` 5: a = 0 in practice) from x_0 noised to a with the step's noise ε (offset
  noise 0.1, hard-coded there) and strides 200 up to s, the last step shorter;
* the target is ε(x_s, s; ∅), the prediction that steps x_s to x_t.

``tests/test_references.py`` checks a step against these formulas. ``noised_start: false``
inverts from x_0 itself (no noise drawn), sdsctl's earlier behaviour.

Model calls per step: the inversion's steps + 2, one after another (each inversion step needs
the one before; ε(x_s, s; ∅) makes x_t; the CFG pair at t is one batched call of two rows). The
denoised estimate is the CFG prediction's at t.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

import sdsctl
from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, Ramp, StepTimes
from sdsctl.diffusion import cfg, ddim_invert, ddim_step, eps_to_x0, strided_path

if TYPE_CHECKING:  # torch is imported where it is used: loading the plugin stays light
    import torch


class ISM(Guidance):
    gives_denoised = True
    unconditional_rows = True

    class Config(ComponentConfig):
        name: str = "ism"
        guidance_scale: float = Field(7.5, ge=0, description="CFG scale w at x_t (LucidDreamer: 7.5)")
        interval: Ramp = Field(Ramp(start=100, end=80, until=0.3),
                               description="δ_T, s = t − δ_T (LucidDreamer: 100 → 80 over the first 30 %)")
        inversion_stride: int = Field(200, ge=1, description="timesteps per inversion step to s (xs_delta_t)")
        inversion_steps: int = Field(5, ge=1, description="at most this many inversion steps to s (xs_inv_steps)")
        noised_start: bool = Field(True, description="start the inversion from x_0 noised to its first timestep")
        offset_noise: float = Field(0.1, ge=0, description="per-channel offset added to the start's noise")

    def __init__(self, config, ctx):
        import torch

        super().__init__(config, ctx)
        self.null = ctx.embeddings("")
        self.pair = torch.cat([ctx.embeddings(ctx.recipe.negative_prompt), ctx.embeddings(ctx.recipe.prompt)])

    def null_eps(self, z: torch.Tensor, t: int) -> torch.Tensor:
        return self.ctx.prior.predict_noise(z, t, self.null)

    def start(self, z: torch.Tensor, a: int) -> torch.Tensor:
        """x_0 noised to timestep ``a`` with offset noise (or x_0 itself without ``noised_start``)."""
        if not self.config.noised_start:
            return z

        noise = self.ctx.randn(z.shape, z.dtype)
        offset = self.ctx.randn((1, z.shape[1], 1, 1), z.dtype)
        return self.ctx.prior.add_noise(z, noise + self.config.offset_noise * offset, a)

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        import torch

        prior, cfg_ = self.ctx.prior, self.config
        a = prior.alphas_cumprod
        t = times.t
        s = max(t - int(cfg_.interval.at(times.progress)), 0)
        first = max(s - cfg_.inversion_stride * cfg_.inversion_steps, 0)
        x_s, _ = ddim_invert(self.null_eps, self.start(z, first), strided_path(first, s, cfg_.inversion_stride), a)
        eps_s = self.null_eps(x_s, s)
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
