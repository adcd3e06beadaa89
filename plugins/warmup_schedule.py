"""Schedule ``warmup``: a warm-up phase at large timesteps, then the guidance's main mode.

The study's second cuisine: "For the first 300 iterations, only sample timestep between
200 to 980 and optimize the NFSD", then robust NFSD. The first ``warmup_steps`` steps draw
t ~ U{warmup_t_min, ..., warmup_t_max} with phase ``warmup``; later steps draw
t ~ U{t_min, ..., t_max} with phase ``main`` (for ``robust-nfsd`` this t is the classifier
term's; it draws the correction's small timestep itself).
"""

from __future__ import annotations

from pydantic import Field, model_validator

import sdsctl
from sdsctl.components import Schedule, StepTimes, TimestepRange


class WarmupSchedule(Schedule):
    class Config(TimestepRange):
        name: str = "warmup"
        warmup_steps: int = Field(300, ge=0, description="number of warm-up steps")
        warmup_t_min: int = Field(200, ge=0, description="smallest warm-up timestep (inclusive)")
        warmup_t_max: int = Field(980, ge=0, description="largest warm-up timestep (inclusive)")
        t_min: int = Field(200, ge=0, description="smallest timestep after warm-up (inclusive)")

        @model_validator(mode="after")
        def _warmup_order(self):
            if self.warmup_t_min >= self.warmup_t_max:
                raise ValueError(f"warmup_t_min ({self.warmup_t_min}) must be below warmup_t_max ({self.warmup_t_max})")
            return self

    @classmethod
    def check(cls, config, recipe, model) -> list[str]:
        model.check_timestep(config.t_max, "t_max")
        model.check_timestep(config.warmup_t_max, "warmup_t_max")
        if recipe.steps <= config.warmup_steps:
            return [f"steps ({recipe.steps}) <= schedule.warmup_steps ({config.warmup_steps}): the run never leaves "
                    f"its warm-up, every step is phase 'warmup' (a guidance's main mode, e.g. robust NFSD's, never "
                    f"runs); raise steps above {config.warmup_steps} or lower schedule.warmup_steps"]
        return []

    def __call__(self, step: int) -> StepTimes:
        cfg = self.config
        warm = step < cfg.warmup_steps
        lo, hi = (cfg.warmup_t_min, cfg.warmup_t_max) if warm else (cfg.t_min, cfg.t_max)
        return StepTimes(t=self.ctx.randint(lo, hi + 1), phase="warmup" if warm else "main", t_min=lo)


@sdsctl.hookimpl
def register_schedules(register):
    register("warmup", WarmupSchedule)
