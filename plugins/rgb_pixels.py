"""Parameterization ``rgb-pixels``: θ is the RGB image itself, encoded by the VAE each step.

Started, as the study prescribes for colour, from the decoded Gaussian latent (not RGB
noise); ``init: zeros`` starts from a black image. Values are clamped to [0, 1] when
rendered.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

import sdsctl
from sdsctl.components import ComponentConfig, Parameterization

from .latent_pixels import check_resolution


class RGBPixels(Parameterization):
    space = "rgb"

    @classmethod
    def check(cls, config, recipe, model) -> None:
        check_resolution(config.resolution, model)

    class Config(ComponentConfig):
        name: str = "rgb-pixels"
        init: Literal["gaussian", "zeros"] = "gaussian"
        resolution: int | None = Field(None, gt=0, description="image size in pixels; default: the model's native size")

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        size = config.resolution or ctx.prior.image_size
        self.rgb = torch.nn.Parameter(torch.zeros(1, 3, size, size, device=ctx.device))

    def initialize(self) -> None:
        if self.config.init == "gaussian":
            prior, g = self.ctx.prior, self.ctx.generator
            size = self.rgb.shape[-1] // prior.vae_scale_factor
            z = torch.randn((1, prior.latent_channels, size, size), generator=g, device=g.device)
            with torch.no_grad():
                self.rgb.copy_(prior.decode_latents(z).float())

    def forward(self) -> torch.Tensor:
        return self.rgb.clamp(0, 1)


@sdsctl.hookimpl
def register_parameterizations(register):
    register("rgb-pixels", RGBPixels)
