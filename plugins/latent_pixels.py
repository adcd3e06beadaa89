"""Parameterization ``latent-pixels``: θ is the latent image itself (the study's EPL).

The study's finding: start from a Gaussian latent (``init: gaussian``, N(0, I) in the
VAE's scaled latent space, which has about unit variance); a zero start can stall at the
saddle point z = 0 (``init: zeros`` is there to show it).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

import sdsctl
from sdsctl.components import ComponentConfig, InvalidConfig, ModelInfo, Parameterization


def check_resolution(res: int | None, model: ModelInfo) -> None:
    """An image size the VAE factor and the UNet's downsampling both divide (shared by the
    parameterizations that take a ``resolution``)."""
    if res is None:
        return
    if res % model.vae_scale_factor:
        raise InvalidConfig(
            f"{res} is not divisible by the VAE's factor {model.vae_scale_factor}; "
            f"use a multiple of {model.vae_scale_factor * model.latent_multiple} "
            f"(the model's native size is {model.image_size})", field="resolution")
    if (res // model.vae_scale_factor) % model.latent_multiple:
        step = model.vae_scale_factor * model.latent_multiple
        raise InvalidConfig(
            f"{res} gives latents of {res // model.vae_scale_factor} pixels, which the UNet cannot "
            f"halve {model.latent_multiple.bit_length() - 1} times; use a multiple of {step}",
            field="resolution")


class LatentPixels(Parameterization):
    space = "latent"

    class Config(ComponentConfig):
        name: str = "latent-pixels"
        init: Literal["gaussian", "zeros"] = "gaussian"
        resolution: int | None = Field(None, gt=0, description="image size in pixels; default: the model's native size")

    @classmethod
    def check(cls, config, recipe, model: ModelInfo) -> None:
        check_resolution(config.resolution, model)

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        prior = ctx.prior
        size = (config.resolution or prior.image_size) // prior.vae_scale_factor
        self.latents = torch.nn.Parameter(torch.zeros(1, prior.latent_channels, size, size, device=ctx.device))

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


@sdsctl.hookimpl
def register_parameterizations(register):
    register("latent-pixels", LatentPixels)
