"""What the 3D parameterizations share (no plugin itself): the step's camera, the learned
background, the rendered size and its upsampling, views for judging, the MLP's seeded start.

A subclass renders one view -- ``render(camera, size, jitter) -> (image [1, C, size, size],
figures)`` -- and may turn the figures into a regularizer (:meth:`regularizer`); the rest of the
loop's contract for a scene (``docs/3d.md``: ``camera``, ``view``, ``image``, ``render_size``,
``out_size``, ``last_regularizer``) is here.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from sdsctl.cameras import Camera
from sdsctl.components import ComponentConfig, InvalidConfig, Parameterization
from sdsctl.hashgrid import HashGridConfig

#: the scene lives in the sphere of this radius around the origin (cameras stay outside it)
RADIUS = 1.0


def scene_grid() -> HashGridConfig:
    """A 3-D grid sized for a CPU: 8 levels from 8 to 137 vertices per axis, 2¹⁵ entries each
    (threestudio's GPU default is 16 levels from 16, 2¹⁹ entries: ``grid: {...}`` restores it)."""
    return HashGridConfig(n_levels=8, n_features_per_level=2, log2_hashmap_size=15, base_resolution=8,
                          per_level_scale=1.5)


class SceneOptions(ComponentConfig):
    render_size: int | None = Field(None, gt=0, description="pixels per side of the rendered view (rgb: default "
                                    "32, upsampled to the model's resolution; latent: default the latent size)")
    grid: HashGridConfig = Field(default_factory=scene_grid, description="the 3-D hash encoding")
    hidden_width: int = Field(64, gt=0, description="width of the MLP's hidden layer")
    background: Literal["solid", "view"] = Field("solid", description="solid: one learned colour; view: a learned "
                                                 "colour of the view direction")
    background_lr: float = Field(10.0, gt=0, description="the background's learning rate as a multiple of "
                                 "optimizer.lr (a few parameters that must cross the colour range in one run)")


def seeded(layers: list[nn.Module], generator: torch.Generator) -> None:
    """nn.Linear's default distribution U(±1/√fan_in), drawn from the run's generator."""
    for layer in layers:
        if isinstance(layer, nn.Linear):
            bound = layer.in_features ** -0.5
            for tensor in (layer.weight, layer.bias):
                noise = torch.rand(tensor.shape, generator=generator, device=generator.device)
                tensor.data.copy_(noise * 2 * bound - bound)


class SceneParameterization(Parameterization):
    """A 3D scene rendered from :attr:`camera` (set by the loop each step)."""

    scene = True
    space = "rgb"

    @classmethod
    def check(cls, config, recipe, model) -> list[str] | None:
        native = model.latent_size if cls.space_for(config) == "latent" else model.image_size
        if config.render_size is not None and native and config.render_size > native:
            what = "latent pixels" if cls.space_for(config) == "latent" else "pixels"
            raise InvalidConfig(f"render_size {config.render_size} is larger than the model's resolution "
                                f"({native} {what}); use render_size ≤ {native}", field="render_size")
        return None

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.space = self.space_for(config)
        prior = ctx.prior
        _, self.channels, latent_size, _ = prior.latent_shape(None)
        if self.space == "latent":
            self.out_size = latent_size
            self.render_size = config.render_size or latent_size
        else:
            self.channels, self.out_size = 3, prior.image_size
            self.render_size = min(config.render_size or 32, self.out_size)
        solid = config.background == "solid"  # one learned colour, or one of the view direction
        self.background_colour = nn.Parameter(torch.zeros(self.channels, device=ctx.device)) if solid else None
        self.background_map = None if solid else nn.Linear(3, self.channels).to(ctx.device)
        if self.background_map is not None:
            seeded([self.background_map], ctx.generator)
        self.camera: Camera | None = None  # the step's camera (the loop sets it)
        self.last_regularizer: torch.Tensor | None = None

    # -- to be given by a scene
    def render(self, camera: Camera, size: int, jitter: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The view ``[1, C, size, size]`` from ``camera`` and figures for :meth:`regularizer`."""
        raise NotImplementedError

    def regularizer(self, figures: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The scene's own weighted losses for a training view (None: none)."""
        return None

    # -- shared
    def parameter_groups(self, lr: float) -> list[dict]:
        """The background learns ``background_lr`` times faster than the scene (its few values
        must move from grey to any colour within a run; the scene's many values need not)."""
        background = [p for p in (self.background_colour, self.background_map) if p is not None]
        background = [q for p in background for q in ([p] if isinstance(p, nn.Parameter) else p.parameters())]
        ids = {id(p) for p in background}
        return [{"params": [p for p in self.parameters() if id(p) not in ids]},
                {"params": background, "lr": lr * self.config.background_lr}]

    def colour(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(raw) if self.space == "rgb" else raw

    def background(self, directions: torch.Tensor) -> torch.Tensor:
        if self.background_map is not None:
            return self.colour(self.background_map(directions))
        return self.colour(self.background_colour)

    def light(self, camera: Camera, jitter: bool, device) -> torch.Tensor:
        """The unit direction towards a light near the camera (DreamFusion: the light's position is
        the camera's, perturbed; here a normal perturbation of half its distance, when training)."""
        light = torch.tensor(camera.position(), device=device)
        if jitter:
            light = light + self.ctx.randn((3,)).to(device) * 0.5 * light.norm()
        return light / light.norm()

    def upsampled(self, image: torch.Tensor) -> torch.Tensor:
        if image.shape[-1] == self.out_size:
            return image
        return F.interpolate(image, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)

    def forward(self) -> torch.Tensor:
        camera = self.camera or self.front()
        jitter = self.camera is not None and self.training
        image, figures = self.render(camera, self.render_size, jitter)
        if jitter:
            self.last_regularizer = self.regularizer(figures)
        return self.upsampled(image)

    def front(self) -> Camera:
        return Camera(azimuth=0.0, elevation=15.0, distance=2.3, fov=55.0)

    def _picture(self, image: torch.Tensor) -> torch.Tensor:
        if self.space == "latent":
            image = self.ctx.prior.decode_latents(image)
        return image[0].float().clamp(0, 1)

    def view(self, camera: Camera, size: int | None = None) -> torch.Tensor:
        """The view from ``camera`` as RGB ``[3, size, size]`` in [0, 1] (no jitter, no gradient;
        latents decoded); ``size``: the rendered size (default: the training view's)."""
        with torch.no_grad():
            image, _ = self.render(camera, size or self.render_size, jitter=False)
            return self._picture(image)

    def image(self) -> torch.Tensor:
        """The current training view (the front view before the first step), without jitter."""
        with torch.no_grad():
            image, _ = self.render(self.camera or self.front(), self.render_size, jitter=False)
            return self._picture(self.upsampled(image))
