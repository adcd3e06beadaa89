"""Schedule ``hifa``: HiFA's decreasing timestep (Zhu & Zhuang 2023, "HiFA", eq. 9).

    t = t_max − (t_max − t_min) · √(step / steps)

Large timesteps first build the global structure, small ones later move the image to the
data distribution; the study pairs it with NFSD in its first cuisine.
"""

from __future__ import annotations

import math

import sdsctl
from sdsctl.components import Schedule, StepTimes, TimestepRange


class HiFASchedule(Schedule):
    class Config(TimestepRange):
        name: str = "hifa"

    @classmethod
    def check(cls, config, recipe, model) -> None:
        model.check_timestep(config.t_max, "t_max")

    def __call__(self, step: int) -> StepTimes:
        r = step / self.ctx.steps
        return StepTimes(t=round(self.config.t_max - (self.config.t_max - self.config.t_min) * math.sqrt(r)))


@sdsctl.hookimpl
def register_schedules(register):
    register("hifa", HiFASchedule)
