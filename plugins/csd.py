"""Guidance ``csd``: Classifier Score Distillation (Yu et al. 2023, arXiv 2310.19415).

CSD keeps only the prompt's classifier directions of the CFG score and no noise term::

    score = w · (ε(x_t; y) + u · ε(x_t; y_neg) + n · ε(x_t; ∅))

With u = 0, n = −1 it is w·(ε_y − ε_∅), the implicit classifier's score (eq. 6); with u = −1,
n = 0 it is w·(ε_y − ε_neg) (the negative-prompt form, eq. 8). The authors' code anneals u
from 0 to −1 and n from −1 to 0 over the run and normalizes the score; here u and n are
:class:`Ramp` s (a constant, or ``{start, end}`` linear over the run's steps) and ``normalize``
divides the score by its norm. y_neg is the recipe's ``negative_prompt``; empty, it is ∅.

x_t is noised with random noise as in SDS (the noise itself is not subtracted). All rows go
through the UNet in one batched call: one model call per step (three rows; two when the
negative prompt is empty). The denoised estimate is that of ε(∅) + w·(ε_y + u·ε_neg + n·ε_∅),
the CFG prediction when u + n = −1. The guidance counts its steps (saved in ``state.pt``) to
know where the ramps are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, model_validator

import sdsctl
from sdsctl.components import ComponentConfig, Guidance, GuidanceOutput, StepTimes
from sdsctl.diffusion import eps_to_x0

if TYPE_CHECKING:  # torch is imported where it is used: loading the plugin stays light
    import torch


class Ramp(BaseModel):
    """A value over the run: ``start`` at the first step, ``end`` at the last, linear between.
    A recipe may write a number for a constant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    start: float
    end: float

    @model_validator(mode="before")
    @classmethod
    def _constant(cls, value):
        return {"start": value, "end": value} if isinstance(value, (int, float)) else value

    def at(self, fraction: float) -> float:
        return self.start + (self.end - self.start) * min(max(fraction, 0.0), 1.0)


class CSD(Guidance):
    gives_denoised = True

    class Config(ComponentConfig):
        name: str = "csd"
        guidance_scale: float = Field(7.5, ge=0, description="w")
        u: Ramp = Field(Ramp(start=0.0, end=0.0), description="weight of ε(y_neg)")
        n: Ramp = Field(Ramp(start=-1.0, end=-1.0), description="weight of ε(∅)")
        normalize: bool = Field(False, description="divide the score by its norm (the authors' code)")

    def __init__(self, config, ctx):
        import torch

        super().__init__(config, ctx)
        self.with_negative = bool(ctx.recipe.negative_prompt)
        rows = [ctx.embeddings(""), ctx.embeddings(ctx.recipe.prompt)]
        if self.with_negative:
            rows.append(ctx.embeddings(ctx.recipe.negative_prompt))
        self.embeddings = torch.cat(rows)
        self.steps_done = 0

    def weights(self) -> tuple[float, float]:
        """(u, n) at this step."""
        fraction = self.steps_done / max(self.ctx.steps - 1, 1)
        return self.config.u.at(fraction), self.config.n.at(fraction)

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        import torch

        prior, g, w = self.ctx.prior, self.ctx.generator, self.config.guidance_scale
        u, n = self.weights()
        self.steps_done += 1
        eps = torch.randn(z.shape, generator=g, device=g.device, dtype=z.dtype)
        z_t = prior.add_noise(z, eps, times.t)
        rows = self.embeddings.shape[0]
        preds = prior.predict_noise(torch.cat([z_t] * rows), times.t, self.embeddings).chunk(rows)
        e_null, e_cond = preds[0], preds[1]
        e_neg = preds[2] if self.with_negative else e_null
        direction = w * (e_cond + u * e_neg + n * e_null)
        norm = direction.norm()
        score = direction / norm.clamp_min(1e-12) if self.config.normalize else direction
        return GuidanceOutput(
            score=score,
            norms={"classifier": norm, "u": u, "n": n},
            timesteps={"t": times.t},
            denoised=lambda: eps_to_x0(e_null + direction, z_t, prior.alphas_cumprod[times.t]),
        )

    def state_dict(self):
        return {"steps_done": self.steps_done}

    def load_state_dict(self, state):
        self.steps_done = int(state.get("steps_done", 0))


@sdsctl.hookimpl
def register_guidances(register):
    register("csd", CSD)
