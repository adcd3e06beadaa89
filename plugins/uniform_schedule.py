"""Schedule ``uniform``: t ~ U{t_min, ..., t_max} each step (DreamFusion: t ~ U[20, 980])."""

from __future__ import annotations

import sdsctl
from sdsctl.components import Schedule, StepTimes, TimestepRange


class UniformSchedule(Schedule):
    class Config(TimestepRange):
        name: str = "uniform"

    @classmethod
    def check(cls, config, recipe, model) -> None:
        model.check_timestep(config.t_max, "t_max")

    def __call__(self, step: int) -> StepTimes:
        return StepTimes(t=self.ctx.randint(self.config.t_min, self.config.t_max + 1), t_min=self.config.t_min)


@sdsctl.hookimpl
def register_schedules(register):
    register("uniform", UniformSchedule)
