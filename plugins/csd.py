"""Guidance ``csd``: Classifier Score Distillation (Yu et al. 2023, arXiv 2310.19415).

CSD keeps only the prompt's classifier directions of the CFG score and no noise term::

    d     = w · (ε(x_t; y) + u · ε(x_t; y_neg) + n · ε(x_t; ∅))
    score = d / (‖d‖ + 1e-8)       (``normalize``, the authors' default; else d)

With u = 0, n = −1 it is w·(ε_y − ε_∅), the implicit classifier's score (eq. 6); with u = −1,
n = 0 it is w·(ε_y − ε_neg) (the negative-prompt form, eq. 8). y_neg is the recipe's
``negative_prompt``; empty, it is ∅. u and n are :class:`~sdsctl.components.Ramp` s read at
the run's progress.

Reference: CVMI-Lab/Classifier-Score-Distillation@5c65ca7,
``threestudio/models/guidance/deep_floyd_simple_guidance.py`` (L235–263:
``grad = w * (cond_scale·ε_y + uncond_scale·ε_neg + null_scale·ε_∅)``, then
``grad / (grad.norm(2) + 1e-8)``) -- its "uncond" is the negative prompt, its "null" the empty
one -- and ``configs/csd-if-object.yaml`` (``cond_scale`` 1, ``uncond_scale`` 0 → −1 and
``null_scale`` −1 → 0 over the first half of the run, ``weighting_strategy: uniform``, t_max
0.98 → 0.5 at half the run): ``recipes/csd.yaml``. ``tests/test_references.py`` checks a step
against it.

**Normalization and w(t).** The authors multiply by w(t) *before* normalizing, so every step
has norm 1 whatever w(t) is. sdsctl's loop applies the recipe's weighting *after* the score,
so CSD's recipe sets ``weighting: uniform`` -- the same step, since d/‖d‖ is unchanged by a
positive w(t). With ``normalize`` and another weighting the step norm is w(t); validation says so.

x_t is noised with random noise as in SDS (the noise itself is not subtracted). All rows go
through the UNet in one batched call: one model call per step (three rows; two when the
negative prompt is empty). The denoised estimate is that of the prediction ε(∅) + d (d before
normalization).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

import sdsctl
from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, Ramp, StepTimes
from sdsctl.diffusion import eps_to_x0

if TYPE_CHECKING:  # torch is imported where it is used: loading the plugin stays light
    import torch


class CSD(Guidance):
    gives_denoised = True
    unconditional_rows = True

    class Config(ComponentConfig):
        name: str = "csd"
        guidance_scale: float = Field(1.0, ge=0, description="w, the weight of ε(y) (the authors' cond_scale: 1)")
        u: Ramp = Field(Ramp(start=0.0, end=0.0), description="weight of ε(y_neg) (uncond_scale)")
        n: Ramp = Field(Ramp(start=-1.0, end=-1.0), description="weight of ε(∅) (null_scale)")
        normalize: bool = Field(True, description="divide the score by its norm (the authors' grad_normalize)")

    @classmethod
    def check(cls, config, recipe, model) -> list[str]:
        if config.normalize and recipe.weighting.name != "uniform":
            return [f"normalize divides the score by its norm, then the loop multiplies by weighting "
                    f"{recipe.weighting.name!r}: each step has norm w(t), where CSD's authors weight first and "
                    "normalize after (norm 1 every step); use weighting: uniform for theirs"]
        return []

    def __init__(self, config, ctx):
        import torch

        super().__init__(config, ctx)
        self.with_negative = bool(ctx.recipe.negative_prompt)
        rows = [ctx.embeddings(""), ctx.embeddings(ctx.recipe.prompt)]
        if self.with_negative:
            rows.append(ctx.embeddings(ctx.recipe.negative_prompt))
        self.embeddings = torch.cat(rows)

    def weights(self, progress: float) -> tuple[float, float]:
        """(u, n) at ``progress``."""
        return self.config.u.at(progress), self.config.n.at(progress)

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        import torch

        prior, w = self.ctx.prior, self.config.guidance_scale
        u, n = self.weights(times.progress)
        eps = self.ctx.randn(z.shape, z.dtype)
        z_t = prior.add_noise(z, eps, times.t)
        rows = self.embeddings.shape[0]
        preds = prior.predict_noise(torch.cat([z_t] * rows), times.t, self.embeddings).chunk(rows)
        e_null, e_cond = preds[0], preds[1]
        e_neg = preds[2] if self.with_negative else e_null
        direction = w * (e_cond + u * e_neg + n * e_null)
        norm = direction.norm()
        score = direction / (norm + 1e-8) if self.config.normalize else direction
        return GuidanceOutput(
            score=score,
            norms={"classifier": norm, "u": u, "n": n},
            timesteps={"t": times.t},
            denoised=lambda: eps_to_x0(e_null + direction, z_t, prior.alphas_cumprod[times.t]),
        )


@sdsctl.hookimpl
def register_guidances(register):
    register("csd", CSD)
