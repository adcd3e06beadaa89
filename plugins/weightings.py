"""Weightings w(t) of the score, from the model's ᾱ_t (``alphas_cumprod``).

* ``one-minus-alpha-bar`` (default): w = 1 − ᾱ_t = σ_t² (DreamFusion, Poole et al. 2022);
* ``uniform``: w = 1;
* ``fantasia3d``: w = √ᾱ_t · (1 − ᾱ_t) (Fantasia3D, Chen et al. 2023).
"""

from __future__ import annotations

import sdsctl
from sdsctl.components import ComponentConfig, Weighting


class OneMinusAlphaBar(Weighting):
    class Config(ComponentConfig):
        name: str = "one-minus-alpha-bar"

    def __call__(self, t: int) -> float:
        return float(1 - self.alpha_bar[t])


class UniformWeighting(Weighting):
    class Config(ComponentConfig):
        name: str = "uniform"

    def __call__(self, t: int) -> float:
        return 1.0


class Fantasia3D(Weighting):
    class Config(ComponentConfig):
        name: str = "fantasia3d"

    def __call__(self, t: int) -> float:
        a = self.alpha_bar[t]
        return float(a.sqrt() * (1 - a))


@sdsctl.hookimpl
def register_weightings(register):
    register("one-minus-alpha-bar", OneMinusAlphaBar)
    register("uniform", UniformWeighting)
    register("fantasia3d", Fantasia3D)
