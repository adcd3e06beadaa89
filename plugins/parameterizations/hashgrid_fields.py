"""Parameterizations ``latent-hashgrid`` (the study's EHL) and ``rgb-hashgrid`` (EHC).

θ is a multiresolution hash encoding of pixel-centre (u, v) followed by a small MLP
(``sdsctl.hashgrid``, Instant-NGP): ``latent-hashgrid`` gives the latent channels at latent
resolution; ``rgb-hashgrid`` gives RGB at image resolution, which the loop encodes with the
VAE (gradients flow through the encoder). Initialization follows the study: the latent
field is pre-fitted to a Gaussian latent sample, the RGB field to the *decoded* Gaussian
latent, never to RGB noise. ``init: zeros`` pre-fits to zeros for comparison.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from sdsctl.components import ComponentConfig, Parameterization
from sdsctl.hashgrid import HashGridConfig, HashGridField, fit_to


class HashGridOptions(ComponentConfig):
    init: Literal["gaussian", "zeros"] = "gaussian"
    resolution: int | None = Field(None, gt=0, description="image size in pixels; default: the model's native size")
    grid: HashGridConfig = Field(default_factory=HashGridConfig,
                                 description="hash encoding (tiny-cuda-nn's HashGrid options)")
    hidden_width: int = Field(32, gt=0, description="width of the MLP's hidden layers")
    hidden_layers: int = Field(1, ge=0, description="number of hidden layers")
    output_activation: Literal["none", "sigmoid", "tanh"] = Field(
        "none", description="the MLP's last activation (latents are unbounded: none)")
    init_steps: int = Field(300, ge=0, description="Adam steps of the pre-fit to the initial image")
    init_lr: float = Field(1e-2, gt=0, description="learning rate of the pre-fit")


class _HashGridParameterization(Parameterization):
    @classmethod
    def check(cls, config, recipe, model) -> None:
        model.check_resolution(config.resolution)


    def _field(self, size: int, channels: int) -> HashGridField:
        c = self.config
        return HashGridField(size, channels, c.grid, hidden_width=c.hidden_width, n_hidden_layers=c.hidden_layers,
                             output_activation=c.output_activation, device=self.ctx.device,
                             generator=self.ctx.generator)

    def _gaussian_latent(self) -> torch.Tensor:
        g = self.ctx.generator
        return torch.randn(self.ctx.prior.latent_shape(self.config.resolution), generator=g, device=g.device)

    def initial_target(self) -> torch.Tensor:
        raise NotImplementedError

    def initialize(self) -> None:
        target = self.initial_target()
        if self.config.init == "zeros":
            target = torch.zeros_like(target)
        fit_to(self, target, steps=self.config.init_steps, lr=self.config.init_lr)  # through forward's output map

    def forward(self) -> torch.Tensor:
        return self.field()


class LatentHashGrid(_HashGridParameterization):
    space = "latent"

    class Config(HashGridOptions):
        name: str = "latent-hashgrid"

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        _, channels, size, _ = ctx.prior.latent_shape(config.resolution)
        self.field = self._field(size, channels)

    def initial_target(self) -> torch.Tensor:
        return self._gaussian_latent()


class RGBHashGrid(_HashGridParameterization):
    """RGB in [0, 1] from ``sigmoid`` or (tanh + 1)/2: both smooth, so no output value is ever cut
    off from its gradient (a clamp would strand a pixel that overshoots)."""

    space = "rgb"

    class Config(HashGridOptions):
        name: str = "rgb-hashgrid"
        output_activation: Literal["sigmoid", "tanh"] = Field(
            "sigmoid", description="how the MLP's output becomes [0, 1]: sigmoid, or tanh mapped as (tanh + 1)/2")

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.field = self._field(config.resolution or ctx.prior.image_size, 3)

    def initial_target(self) -> torch.Tensor:
        with torch.no_grad():
            return self.ctx.prior.decode_latents(self._gaussian_latent()).float()

    def forward(self) -> torch.Tensor:
        x = self.field()
        return x if self.config.output_activation == "sigmoid" else (x + 1) / 2
