"""Parameterization ``rgb-pixels``: θ is the RGB image itself, encoded by the VAE each step.

Started, as the study prescribes for colour, from the decoded Gaussian latent (not RGB
noise); ``init: zeros`` starts from a black image. θ holds logits and the image is
sigmoid(θ): every value of θ renders inside [0, 1] and every pixel keeps a gradient, so a
pixel pushed towards 0 or 1 can come back (a clamp would leave it there with no gradient).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from sdsctl.components import ComponentConfig, Parameterization

#: images are kept this far inside (0, 1) when turned into logits (a finite θ for black/white)
EDGE = 1e-3


def logit(rgb: torch.Tensor) -> torch.Tensor:
    return torch.logit(rgb.clamp(EDGE, 1 - EDGE))


class RGBPixels(Parameterization):
    space = "rgb"

    @classmethod
    def check(cls, config, recipe, model) -> None:
        model.check_resolution(config.resolution)

    class Config(ComponentConfig):
        name: str = "rgb-pixels"
        init: Literal["gaussian", "zeros"] = "gaussian"
        resolution: int | None = Field(None, gt=0, description="image size in pixels; default: the model's native size")

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        size = config.resolution or ctx.prior.image_size
        self.logits = torch.nn.Parameter(torch.full((1, 3, size, size), torch.logit(torch.tensor(EDGE)).item(),
                                                    device=ctx.device))

    def initialize(self) -> None:
        if self.config.init == "gaussian":
            prior, g = self.ctx.prior, self.ctx.generator
            z = torch.randn(prior.latent_shape(self.logits.shape[-1]), generator=g, device=g.device)
            with torch.no_grad():
                self.logits.copy_(logit(prior.decode_latents(z).float()))

    def forward(self) -> torch.Tensor:
        return torch.sigmoid(self.logits)

    def assign(self, target: torch.Tensor) -> bool:
        """A full fit to a target image (``fit_space: image``) is an assignment of its logits."""
        self.logits.copy_(logit(target))
        return True
