"""Weightings w(t) of the score, from the model's ᾱ_t (``alphas_cumprod``).

* ``one-minus-alpha-bar`` (default): w = 1 − ᾱ_t = σ_t² (DreamFusion, Poole et al. 2022);
* ``uniform``: w = 1;
* ``fantasia3d``: w = √ᾱ_t · (1 − ᾱ_t) (Fantasia3D, Chen et al. 2023);
* ``sigma-over-alpha``: w = √((1 − ᾱ_t)/ᾱ_t) = σ_t/α_t, the weight of fitting the one-step
  denoised estimate x̂₀ instead of the noise: x₀ − x̂₀ = (σ_t/α_t)·(ε̂ − ε). LucidDreamer's ISM
  (EnVision-Research/LucidDreamer@2ecf093, guidance/sd_utils.py ``train_step``:
  ``w = lambda alphas: (((1 - alphas) / alphas) ** 0.5)``) and threestudio's SDI (a loss on
  x̂₀, ``stable_diffusion_sdi_guidance.py``) weight this way (tests/test_references.py);
* ``rfds``: w = 1/(1 − σ_t), σ_t the flow σ of ᾱ_t (``sdsctl.diffusion.sigma_from_alpha_bar``).
  On a flow-matching model SDS's ε residual is (1 − σ)·(v̂ − (ε − x₀)), so this weight makes
  the step RFDS's velocity residual v̂ − (ε − x₀) (Yang et al. 2024, arXiv 2406.03293, with
  its w = 1). On any other model it is the same function of ᾱ_t.
"""

from __future__ import annotations

import sdsctl
from sdsctl.components import ComponentConfig, Weighting
from sdsctl.diffusion import sigma_from_alpha_bar
from sdsctl.errors import SdsctlError


class OneMinusAlphaBar(Weighting):
    class Config(ComponentConfig):
        name: str = "one-minus-alpha-bar"

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.table = (1 - self.alpha_bar).tolist()  # every t's weight once: a step reads a float

    def __call__(self, t: int) -> float:
        return self.table[t]


class UniformWeighting(Weighting):
    class Config(ComponentConfig):
        name: str = "uniform"

    def __call__(self, t: int) -> float:
        return 1.0


class Fantasia3D(Weighting):
    class Config(ComponentConfig):
        name: str = "fantasia3d"

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        a = self.alpha_bar
        self.table = (a.sqrt() * (1 - a)).tolist()

    def __call__(self, t: int) -> float:
        return self.table[t]


class SigmaOverAlpha(Weighting):
    class Config(ComponentConfig):
        name: str = "sigma-over-alpha"

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        a = self.alpha_bar
        self.table = ((1 - a) / a).sqrt().tolist()

    def __call__(self, t: int) -> float:
        if self.table[t] == float("inf"):
            raise SdsctlError(f"weighting sigma-over-alpha: t={t} is pure noise on this model (ᾱ = 0), where "
                              "√((1 − ᾱ)/ᾱ) is infinite; keep the schedule's t_max below it")
        return self.table[t]


class RFDSWeighting(Weighting):
    class Config(ComponentConfig):
        name: str = "rfds"

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.sigma = sigma_from_alpha_bar(self.alpha_bar)

    def __call__(self, t: int) -> float:
        sigma = float(self.sigma[t])
        if sigma >= 1:
            raise SdsctlError(f"weighting rfds: t={t} is pure noise on this model (σ = 1, ᾱ = 0), where the ε residual "
                              "is zero and 1/(1 − σ) infinite; keep the schedule's t_max below it")
        return 1 / (1 - sigma)


@sdsctl.hookimpl
def register_weightings(register):
    register("one-minus-alpha-bar", OneMinusAlphaBar)
    register("uniform", UniformWeighting)
    register("fantasia3d", Fantasia3D)
    register("sigma-over-alpha", SigmaOverAlpha)
    register("rfds", RFDSWeighting)
