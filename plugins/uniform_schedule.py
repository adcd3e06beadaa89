"""Schedule ``uniform``: t ~ U{t_min, ..., t_max} each step (DreamFusion: t ~ U[20, 980])."""

from __future__ import annotations

from pydantic import Field, ValidationInfo, field_validator

import sdsctl
from sdsctl.components import ComponentConfig, InvalidConfig, Schedule, StepTimes


class UniformSchedule(Schedule):
    class Config(ComponentConfig):
        name: str = "uniform"
        t_min: int = Field(20, ge=0, description="smallest timestep (inclusive)")
        t_max: int = Field(980, ge=0, description="largest timestep (inclusive)")

        @field_validator("t_max")
        @classmethod
        def _order(cls, v: int, info: ValidationInfo) -> int:
            t_min = info.data.get("t_min")
            if t_min is not None and v <= t_min:
                raise ValueError(f"t_max ({v}) must be greater than t_min ({t_min})")
            return v

    @classmethod
    def check(cls, config, recipe, model) -> None:
        last = model.num_train_timesteps - 1
        if config.t_max > last:
            raise InvalidConfig(f"{config.t_max} is outside the model's timesteps 0..{last}", field="t_max")

    def __call__(self, step: int) -> StepTimes:
        return StepTimes(t=self.ctx.randint(self.config.t_min, self.config.t_max + 1))


@sdsctl.hookimpl
def register_schedules(register):
    register("uniform", UniformSchedule)
