"""Guidance ``robust-nfsd``: the study's robust NFSD (``docs/study.md``, claim 8).

"For each iteration, I sample a large timestep to compute the classifier term and
additionally, a small timestep to compute the correction term. I scale the correction
term to make it twice the norm of the classifier term." With the classifier term
δ_C = ε(z_t; y) − ε(z_t; ∅) at the schedule's (large) t and the correction
δ_D = ε(z_s; ∅) at a small s ∈ [correction_t_min, correction_t_max) drawn here::

    score = s_cfg · δ_C + ratio · ‖s_cfg · δ_C‖ / ‖δ_D‖ · δ_D

so every step balances semantics and realism by the same proportion, whatever the
parameterization. During a schedule's ``warmup`` phase it is NFSD at the (large) timestep,
as the study says ("optimize the NFSD"): the classifier term plus ``warmup_correction_scale``
(default 1, NFSD's own) times NFSD's correction with the recipe's ``negative_prompt``. Both
timesteps' rows go through the UNet in one batched call: one model call per step (three
rows). The denoised estimate (HiFA's image target) is the CFG prediction's at the large t.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field, model_validator

import sdsctl
from sdsctl.components import GuidanceOutput, InvalidConfig, StepTimes
from sdsctl.diffusion import eps_to_x0

from .nfsd_terms import NFSDConfig, NFSDTerms

if TYPE_CHECKING:  # torch is imported where it is used: loading the plugin stays light
    import torch


class RobustNFSDConfig(NFSDConfig):
    name: str = "robust-nfsd"
    ratio: float = Field(2.0, gt=0, description="‖correction‖ / ‖classifier‖ after rescaling")
    correction_t_min: int = Field(20, ge=0, description="smallest timestep of the correction term")
    correction_t_max: int = Field(200, gt=0, description="the correction's timestep is below this")
    warmup_correction_scale: float = Field(
        1.0, ge=0, description="NFSD's correction scale during warm-up (0: the classifier term only)")

    @model_validator(mode="after")
    def _order(self):
        if self.correction_t_min >= self.correction_t_max:
            raise ValueError(f"correction_t_min ({self.correction_t_min}) must be below "
                             f"correction_t_max ({self.correction_t_max})")
        return self


class RobustNFSD(NFSDTerms):
    Config = RobustNFSDConfig

    @classmethod
    def check(cls, config, recipe, model) -> None:
        if config.warmup_correction_scale > 0:
            cls.check_negative_prompt(config, recipe, model)
        if config.correction_t_max > model.num_train_timesteps:
            raise InvalidConfig(f"{config.correction_t_max} is outside the model's timesteps "
                                f"0..{model.num_train_timesteps - 1}", field="correction_t_max")

    def __init__(self, config, ctx):
        import torch

        super().__init__(config, ctx)
        self.robust_rows = torch.cat([self.uncond, self.cond, self.uncond])  # ε(z_t; ∅), ε(z_t; y), ε(z_s; ∅)

    def score(self, z: torch.Tensor, times: StepTimes) -> GuidanceOutput:
        import torch

        cfg = self.config
        if times.phase == "warmup":
            return self.nfsd(z, times.t, cfg.warmup_correction_scale)
        s = self.ctx.randint(cfg.correction_t_min, cfg.correction_t_max)
        z_t, z_s = self.noised(z, times.t), self.noised(z, s)
        t_rows = torch.tensor([times.t, times.t, s], device=z.device)
        preds = self.ctx.prior.predict_noise(
            torch.cat([z_t, z_t, z_s]), t_rows.repeat_interleave(z.shape[0]), self.robust_rows).chunk(3)
        c = cfg.guidance_scale * (preds[1] - preds[0])
        d = preds[2]
        c_norm = c.norm()
        d = d * (cfg.ratio * c_norm / d.norm().clamp_min(1e-12))
        return GuidanceOutput(score=c + d, norms={"classifier": c_norm, "correction": d.norm()},
                              timesteps={"t": times.t, "t_correction": s},
                              denoised=lambda: eps_to_x0(preds[0] + c, z_t, self.ctx.prior.alphas_cumprod[times.t]))


@sdsctl.hookimpl
def register_guidances(register):
    register("robust-nfsd", RobustNFSD)
