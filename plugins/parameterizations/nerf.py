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
from sdsctl.hashgrid import HashGridEncoding
from sdsctl.volume import composite, sphere_interval, stratified_depths

from .scene import RADIUS, SceneOptions, SceneParameterization, seeded


class NeRFOptions(SceneOptions):
    name: str = "nerf"
    space: Literal["rgb", "latent"] = Field("rgb", description="rgb: render RGB for the VAE encoder (EHC in 3D); "
                                            "latent: render the model's latent channels (Latent-NeRF, EHL in 3D)")
    samples: int = Field(32, ge=2, description="stratified samples per ray inside the bounding sphere")
    blob_density: float = Field(10.0, description="density added at the centre at initialization (threestudio: 10)")
    blob_radius: float = Field(0.5, gt=0, description="radius of the initial density blob (threestudio: 0.5)")
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


class NeRF(SceneParameterization):
    """A radiance field rendered from :attr:`camera` (set by the loop each step)."""

    class Config(NeRFOptions):
        pass

    @classmethod
    def space_for(cls, config) -> str:
        return config.space

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        g = ctx.generator
        self.encoding = HashGridEncoding(config.grid, device=ctx.device, generator=g, n_input_dims=3)
        self.mlp = nn.Sequential(nn.Linear(self.encoding.n_output_dims, config.hidden_width), nn.ReLU(),
                                 nn.Linear(config.hidden_width, 1 + self.channels)).to(ctx.device)
        seeded(list(self.mlp), g)

    # -- the field
    def field(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density σ ``[N]`` and colour (or latent) ``[N, C]`` at world ``points`` ``[N, 3]``."""
        raw = self.mlp(self.encoding(((points / RADIUS + 1) / 2).clamp(0, 1)))
        return self._density(points, raw[:, 0]), self.colour(raw[:, 1:])

    def density(self, points: torch.Tensor) -> torch.Tensor:
        raw = self.mlp(self.encoding(((points / RADIUS + 1) / 2).clamp(0, 1)))
        return self._density(points, raw[:, 0])

    def _density(self, points: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        c = self.config
        blob = c.blob_density * torch.exp(-0.5 * points.pow(2).sum(-1) / c.blob_radius ** 2)
        return F.softplus(raw + blob)

    def normals(self, points: torch.Tensor, eps: float = 1e-2) -> torch.Tensor:
        """Unit normals −∇σ/|∇σ| by central differences (threestudio's ``finite_difference``)."""
        offsets = torch.eye(3, device=points.device) * eps
        shifted = torch.cat([points[:, None] + offsets, points[:, None] - offsets], dim=1).reshape(-1, 3)
        sigma = self.density(shifted).view(-1, 2, 3)
        grad = (sigma[:, 0] - sigma[:, 1]) / (2 * eps)
        return -grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-6)

    # -- rendering
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
        """Lambertian shading under a light near the camera (:meth:`light`)."""
        light = self.light(camera, jitter, colour.device)
        diffuse = (normals * light).sum(-1, keepdim=True).clamp_min(0)
        shade = self.config.ambient + (1 - self.config.ambient) * diffuse
        albedo = torch.ones_like(colour) if self.config.shading == "textureless" else colour
        return albedo * shade

    def regularizer(self, figures: dict[str, torch.Tensor]) -> torch.Tensor | None:
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
