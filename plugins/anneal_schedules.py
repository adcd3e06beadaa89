"""Schedules whose timesteps move over the run: ``anneal`` (a uniform draw from a range whose
ends follow ramps) and ``linear`` (one timestep a step, decreasing linearly).

* ``anneal``: t ~ U{t_min, ..., t_max} (inclusive), each end a :class:`~sdsctl.components.Ramp`
  read at the run's progress (step / steps). The form of threestudio's annealed
  ``min_step_percent``/``max_step_percent`` (``[start_step, start, end, end_step]``) and of
  LucidDreamer's shrinking ``max_step``. The bundled recipes use it as their authors do:
  ISM's t_max 979 → 499 over the first 30 % of the run (LucidDreamer: ``t_range`` [0.02, 0.5],
  ``max_t_range`` 0.98, ``warmup_iter`` 1500 of 5000), CSD's t_max 980 → 500 at half the run
  (CVMI-Lab/Classifier-Score-Distillation, ``configs/csd-if-object.yaml``), ASD's range
  [500, 980] → [20, 500] over the run (theEricMa/ScaleDreamer, ``configs/single-prompt_benchmark/
  asd_sd_nerf.yaml``). A constant range is the ``uniform`` schedule, draw for draw.
* ``linear``: t = ⌊T · ((start − end)·(1 − progress) + end)⌋ with T the model's training
  timesteps and ``start``/``end`` fractions of it: threestudio's ``t_anneal`` (SDI,
  threestudio-project/threestudio@28d9d80, ``stable_diffusion_sdi_guidance.py::update_step``,
  which sets min and max step to the same annealed percentage), written as it computes it so
  that every step's t is the same integer. No randomness.
"""

from __future__ import annotations

from pydantic import Field, model_validator

import sdsctl
from sdsctl.components import ComponentConfig, InvalidConfig, Ramp, Schedule, StepTimes


class AnnealSchedule(Schedule):
    class Config(ComponentConfig):
        name: str = "anneal"
        t_min: Ramp = Field(Ramp(start=20, end=20), description="smallest timestep (inclusive), a number or a ramp")
        t_max: Ramp = Field(Ramp(start=980, end=980), description="largest timestep (inclusive), a number or a ramp")

        @model_validator(mode="after")
        def _order(self):
            for name in ("t_min", "t_max"):
                ramp = getattr(self, name)
                if min(ramp.start, ramp.end) < 0:
                    raise ValueError(f"{name} must not be negative")
            if self.t_min.start > self.t_max.start or self.t_min.end > self.t_max.end:
                raise ValueError("t_min must not exceed t_max, at the start or at the end of the run")
            return self

    @classmethod
    def check(cls, config, recipe, model) -> None:
        model.check_timestep(round(max(config.t_max.start, config.t_max.end)), "t_max")

    def range(self, progress: float) -> tuple[int, int]:
        """(t_min, t_max) at ``progress``, rounded down to timesteps as threestudio's
        ``int(num_train_timesteps * percent)`` and LucidDreamer's ``int(...)`` do."""
        lo, hi = int(self.config.t_min.at(progress)), int(self.config.t_max.at(progress))
        return lo, max(hi, lo)

    def __call__(self, step: int) -> StepTimes:
        lo, hi = self.range(step / self.ctx.steps)
        return StepTimes(t=self.ctx.randint(lo, hi + 1), t_min=lo)


class LinearSchedule(Schedule):
    class Config(ComponentConfig):
        name: str = "linear"
        start: float = Field(0.98, gt=0, lt=1, description="t / T at the first step (threestudio's max_step_percent)")
        end: float = Field(0.25, ge=0, lt=1, description="t / T reached at the end (threestudio's min_step_percent)")

    @classmethod
    def check(cls, config, recipe, model) -> None:
        if config.end > config.start:
            raise InvalidConfig(f"end ({config.end}) must not exceed start ({config.start}): the timestep decreases",
                                field="end")

    def __call__(self, step: int) -> StepTimes:
        progress = step / self.ctx.steps
        fraction = (self.config.start - self.config.end) * (1 - progress) + self.config.end
        return StepTimes(t=int(self.ctx.prior.num_train_timesteps * fraction))


@sdsctl.hookimpl
def register_schedules(register):
    register("anneal", AnnealSchedule)
    register("linear", LinearSchedule)
