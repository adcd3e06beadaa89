"""Parameterization ``latent-pixels``: θ is the latent image itself (the study's EPL).

The study's finding: start from a Gaussian latent (``init: gaussian``, N(0, I) in the
VAE's scaled latent space, which has about unit variance); a zero start can stall at the
saddle point z = 0 (``init: zeros`` is there to show it).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from sdsctl.components import ComponentConfig, ModelInfo, Parameterization


class LatentPixels(Parameterization):
    space = "latent"

    class Config(ComponentConfig):
        name: str = "latent-pixels"
        init: Literal["gaussian", "zeros"] = "gaussian"
        resolution: int | None = Field(None, gt=0, description="image size in pixels; default: the model's native size")

    @classmethod
    def check(cls, config, recipe, model: ModelInfo) -> None:
        model.check_resolution(config.resolution)

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.latents = torch.nn.Parameter(torch.zeros(ctx.prior.latent_shape(config.resolution), device=ctx.device))

    def initialize(self) -> None:
        if self.config.init == "gaussian":
            g = self.ctx.generator
            with torch.no_grad():
                self.latents.copy_(torch.randn(self.latents.shape, generator=g, device=g.device))

    def forward(self) -> torch.Tensor:
        return self.latents

    def assign(self, target: torch.Tensor) -> bool:
        """θ is the latent: a full fit is an assignment (the study's cuisine 1 on EPL)."""
        self.latents.copy_(target)
        return True
