"""``NeRF``: θ is a radiance field in the unit bounding sphere, rendered from the step's camera.

DreamFusion's NeRF (Poole et al. 2022) as threestudio's ``implicit-volume`` builds it
(threestudio-project/threestudio@28d9d80, threestudio/models/geometry/implicit_volume.py,
threestudio/models/renderers/nerf_volume_renderer.py), without its weight: a 3-D hash grid
(:class:`sdsctl.hashgrid.HashGridEncoding`, the same encoding as EHC, tiny-cuda-nn on CUDA)
and one small MLP give a density and a colour at each sample; the density gets threestudio's
``blob_dreamfusion`` bias (``blob_density · exp(−|p|² / 2 blob_radius²)``) before its softplus,
so a fresh field is a soft ball at the origin. Rays are clipped to the sphere and sampled at
stratified depths (:mod:`sdsctl.volume`); what no sample covers shows the background.

``space: rgb`` (the study's EHC in 3D) renders RGB at ``render_size``, upsampled to the
model's resolution, which the loop encodes with the VAE (pixel models take it as is).
``space: latent`` (Latent-NeRF, Metzer et al. 2023; the study's EHL in 3D) renders the
model's latent channels at latent resolution directly: no encoder in the step.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from sdsctl.cameras import Camera
from sdsctl.components import ComponentConfig, InvalidConfig, Parameterization
from sdsctl.hashgrid import HashGridConfig, HashGridEncoding
from sdsctl.volume import composite, sphere_interval, stratified_depths

#: the scene lives in the sphere of this radius around the origin (cameras stay outside it)
RADIUS = 1.0


def scene_grid() -> HashGridConfig:
    """A 3-D grid sized for a CPU: 8 levels from 8 to 137 vertices per axis, 2¹⁵ entries each
    (threestudio's GPU default is 16 levels from 16, 2¹⁹ entries: ``grid: {...}`` restores it)."""
    return HashGridConfig(n_levels=8, n_features_per_level=2, log2_hashmap_size=15, base_resolution=8,
                          per_level_scale=1.5)


class NeRFOptions(ComponentConfig):
    name: str = "nerf"
    space: Literal["rgb", "latent"] = Field("rgb", description="rgb: render RGB for the VAE encoder (EHC in 3D); "
                                            "latent: render the model's latent channels (Latent-NeRF, EHL in 3D)")
    render_size: int | None = Field(None, gt=0, description="pixels per side of the rendered view (rgb: default "
                                    "32, upsampled to the model's resolution; latent: default the latent size)")
    samples: int = Field(32, ge=2, description="stratified samples per ray inside the bounding sphere")
    grid: HashGridConfig = Field(default_factory=scene_grid, description="the 3-D hash encoding")
    hidden_width: int = Field(64, gt=0, description="width of the MLP's hidden layer")
    blob_density: float = Field(10.0, description="density added at the centre at initialization (threestudio: 10)")
    blob_radius: float = Field(0.5, gt=0, description="radius of the initial density blob (threestudio: 0.5)")
    background: Literal["solid", "view"] = Field("solid", description="solid: one learned colour; view: a learned "
                                                 "colour of the view direction")
    shading: Literal["albedo", "lambertian", "textureless"] = Field(
        "albedo", description="albedo: the colour itself; lambertian/textureless: lit by a random light (DreamFusion)")
    ambient: float = Field(0.1, ge=0, le=1, description="ambient share of the light (lambertian, textureless)")
    sparsity_weight: float = Field(0.0, ge=0, description="weight of the opacity (sparsity) loss")
    entropy_weight: float = Field(0.0, ge=0, description="weight of the accumulated opacity's entropy (0 or 1 per ray)")
    orientation_weight: float = Field(0.0, ge=0, description="weight of the orientation loss (normals facing away "
                                      "from the camera, Ref-NeRF/DreamFusion)")
    mesh_threshold: float = Field(5.0, gt=0, description="density level of the exported mesh's surface")
    mesh_resolution: int = Field(96, ge=16, le=512, description="marching-cubes grid per axis for the mesh")

    @model_validator(mode="after")
    def _latent_shading(self):
        if self.space == "latent" and self.shading != "albedo":
            raise ValueError(f"shading {self.shading!r} lights RGB colours; a latent field has no colours "
                             "to light (use shading: albedo with space: latent)")
        return self


class NeRF(Parameterization):
    """A radiance field rendered from :attr:`camera` (set by the loop each step)."""

    scene = True
    space = "rgb"  # the default; ``space: latent`` chooses latents (:meth:`space_for`)

    class Config(NeRFOptions):
        pass

    @classmethod
    def space_for(cls, config) -> str:
        return config.space

    @classmethod
    def check(cls, config, recipe, model) -> list[str] | None:
        native = model.latent_size if config.space == "latent" else model.image_size
        if config.render_size is not None and native and config.render_size > native:
            what = "latent pixels" if config.space == "latent" else "pixels"
            raise InvalidConfig(f"render_size {config.render_size} is larger than the model's resolution "
                                f"({native} {what}); use render_size ≤ {native}", field="render_size")
        return None

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.space = config.space
        prior = ctx.prior
        _, self.channels, latent_size, _ = prior.latent_shape(None)
        if config.space == "latent":
            self.out_size = latent_size
            self.render_size = config.render_size or latent_size
        else:
            self.channels, self.out_size = 3, prior.image_size
            self.render_size = min(config.render_size or 32, self.out_size)
        g = ctx.generator
        self.encoding = HashGridEncoding(config.grid, device=ctx.device, generator=g, n_input_dims=3)
        self.mlp = nn.Sequential(nn.Linear(self.encoding.n_output_dims, config.hidden_width), nn.ReLU(),
                                 nn.Linear(config.hidden_width, 1 + self.channels)).to(ctx.device)
        solid = config.background == "solid"  # one learned colour, or one of the view direction
        self.background_colour = nn.Parameter(torch.zeros(self.channels, device=ctx.device)) if solid else None
        self.background_map = None if solid else nn.Linear(3, self.channels).to(ctx.device)
        for layer in [*self.mlp, *([self.background_map] if self.background_map is not None else [])]:
            if isinstance(layer, nn.Linear):  # nn.Linear's default distribution, from the run's generator
                bound = layer.in_features ** -0.5
                for tensor in (layer.weight, layer.bias):
                    tensor.data.copy_(torch.rand(tensor.shape, generator=g, device=g.device) * 2 * bound - bound)
        self.camera: Camera | None = None  # the step's camera (the loop sets it)
        self.last_regularizer: torch.Tensor | None = None
        self.last_opacity: torch.Tensor | None = None

    # -- the field
    def field(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density σ ``[N]`` and colour (or latent) ``[N, C]`` at world ``points`` ``[N, 3]``."""
        raw = self.mlp(self.encoding(((points / RADIUS + 1) / 2).clamp(0, 1)))
        return self._density(points, raw[:, 0]), self._colour(raw[:, 1:])

    def density(self, points: torch.Tensor) -> torch.Tensor:
        raw = self.mlp(self.encoding(((points / RADIUS + 1) / 2).clamp(0, 1)))
        return self._density(points, raw[:, 0])

    def _density(self, points: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        c = self.config
        blob = c.blob_density * torch.exp(-0.5 * points.pow(2).sum(-1) / c.blob_radius ** 2)
        return F.softplus(raw + blob)

    def _colour(self, raw: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(raw) if self.space == "rgb" else raw

    def normals(self, points: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
        """Unit normals −∇σ/|∇σ| by central differences (threestudio's ``finite_difference``)."""
        offsets = torch.eye(3, device=points.device) * eps
        shifted = torch.cat([points[:, None] + offsets, points[:, None] - offsets], dim=1).reshape(-1, 3)
        sigma = self.density(shifted).view(-1, 2, 3)
        grad = (sigma[:, 0] - sigma[:, 1]) / (2 * eps)
        return -grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    # -- rendering
    def background(self, directions: torch.Tensor) -> torch.Tensor:
        if self.background_map is not None:
            return self._colour(self.background_map(directions))
        return self._colour(self.background_colour)

    def render(self, camera: Camera, size: int, jitter: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The view ``[1, C, size, size]`` from ``camera`` and its per-ray figures."""
        origins, directions = camera.rays(size, device=self.encoding.params.device)
        near, far, _ = sphere_interval(origins, directions, RADIUS)
        depths = stratified_depths(near, far, self.config.samples, self.ctx.generator if jitter else None)
        points = origins[:, None] + directions[:, None] * depths[..., None]
        density, colour = self.field(points.reshape(-1, 3))
        density = density.view(depths.shape)
        colour = colour.view(*depths.shape, self.channels)
        normals = None
        if self.config.shading != "albedo" or (jitter and self.config.orientation_weight > 0):
            normals = self.normals(points.reshape(-1, 3)).view(*depths.shape, 3)
        if self.config.shading != "albedo":
            colour = self._shade(colour, normals, camera, jitter)
        rendered, opacity, weights = composite(density, colour, depths, far, self.background(directions))
        image = rendered.t().reshape(1, self.channels, size, size)
        return image, {"opacity": opacity, "weights": weights, "normals": normals, "directions": directions}

    def _shade(self, colour, normals, camera: Camera, jitter: bool) -> torch.Tensor:
        """Lambertian shading under a light near the camera (DreamFusion: the light's position
        is the camera's, perturbed; here a unit normal perturbation of its direction)."""
        light = torch.tensor(camera.position(), device=colour.device)
        if jitter:
            light = light + self.ctx.randn((3,)).to(colour.device) * 0.5 * light.norm()
        light = light / light.norm()
        diffuse = (normals * light).sum(-1, keepdim=True).clamp_min(0)
        shade = self.config.ambient + (1 - self.config.ambient) * diffuse
        albedo = torch.ones_like(colour) if self.config.shading == "textureless" else colour
        return albedo * shade

    def forward(self) -> torch.Tensor:
        camera = self.camera or self.front()
        jitter = self.camera is not None and self.training
        image, figures = self.render(camera, self.render_size, jitter)
        if jitter:
            self.last_regularizer = self._regularizer(figures)
            self.last_opacity = figures["opacity"].detach()
        if self.render_size != self.out_size:
            image = F.interpolate(image, size=(self.out_size, self.out_size), mode="bilinear", align_corners=False)
        return image

    def _regularizer(self, figures: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """threestudio's λ-weighted regularizers (``dreamfusion.py``): sparsity √(o² + 0.01),
        the opacity's binary entropy, the orientation loss Σ w·max(0, n·d)²."""
        c = self.config
        terms = []
        opacity = figures["opacity"]
        if c.sparsity_weight:
            terms.append(c.sparsity_weight * (opacity.pow(2) + 0.01).sqrt().mean())
        if c.entropy_weight:
            o = opacity.clamp(1e-3, 1 - 1e-3)
            terms.append(c.entropy_weight * (-(o * o.log() + (1 - o) * (1 - o).log())).mean())
        if c.orientation_weight and figures["normals"] is not None:
            facing = (figures["normals"] * figures["directions"][:, None]).sum(-1).clamp_min(0).pow(2)
            terms.append(c.orientation_weight * (figures["weights"].detach() * facing).sum(-1).mean())
        return sum(terms) if terms else None

    def front(self) -> Camera:
        return Camera(azimuth=0.0, elevation=15.0, distance=2.3, fov=55.0)

    def view(self, camera: Camera, size: int | None = None) -> torch.Tensor:
        """The view from ``camera`` as RGB ``[3, size, size]`` in [0, 1] (no jitter, no gradient;
        latent fields decoded); ``size``: the rendered size (default: the training view's)."""
        with torch.no_grad():
            image, _ = self.render(camera, size or self.render_size, jitter=False)
            if self.space == "latent":
                image = self.ctx.prior.decode_latents(image)
            return image[0].float().clamp(0, 1)

    def image(self) -> torch.Tensor:
        """The current training view (the front view before the first step), without jitter."""
        with torch.no_grad():
            image, _ = self.render(self.camera or self.front(), self.render_size, jitter=False)
            if self.render_size != self.out_size:
                image = F.interpolate(image, size=(self.out_size, self.out_size), mode="bilinear",
                                      align_corners=False)
            if self.space == "latent":
                image = self.ctx.prior.decode_latents(image)
            return image[0].float().clamp(0, 1)

    # -- the mesh
    def mesh_grid(self, resolution: int | None = None) -> tuple[torch.Tensor, float]:
        """The density on a ``resolution³`` grid over the bounding cube and its spacing."""
        n = resolution or self.config.mesh_resolution
        axis = torch.linspace(-RADIUS, RADIUS, n, device=self.encoding.params.device)
        points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
        with torch.no_grad():
            density = torch.cat([self.density(chunk) for chunk in points.split(65536)])
        return density.view(n, n, n), 2 * RADIUS / (n - 1)

    def surface_colours(self, points: torch.Tensor) -> torch.Tensor:
        """The field's colour ``[N, C]`` at ``points``: RGB in [0, 1], or latent channels (which
        :mod:`sdsctl.engine.scene` maps to RGB with a linear map fitted on the decoded views)."""
        with torch.no_grad():
            return torch.cat([self.field(chunk)[1] for chunk in points.split(65536)])
