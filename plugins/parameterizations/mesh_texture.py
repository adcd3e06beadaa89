"""``MeshTexture``: θ is the colour of a given mesh's surface, painted from many views.

TEXTure's and Fantasia3D's appearance stage without a GPU rasterizer: the geometry is fixed
(a file or a primitive, :mod:`sdsctl.meshes`, normalized to ``scale`` inside the bounding
sphere); each step the camera's rays are cast against it with trimesh's intersector, without
gradients, and the colour field -- the same 3-D hash grid and MLP as ``nerf``'s -- is evaluated
at the hit points; rays that miss show the learned background. Gradients reach only the colour
field and the background. RGB goes through the VAE encoder on latent models (as EHC) and
straight into pixel models.

The exported mesh (:meth:`MeshTexture.textured`) is the input mesh, in its own coordinates,
with the field baked into vertex colours and, where it has UV coordinates, into a texture
image in UV space (``texture.png``, and the GLB's material).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field
from torch import nn

from sdsctl.cameras import Camera
from sdsctl.components import InvalidConfig
from sdsctl.hashgrid import HashGridEncoding
from sdsctl.meshes import MeshError, cast, load_mesh, normalized

from .scene import RADIUS, SceneOptions, SceneParameterization, seeded


class MeshTextureOptions(SceneOptions):
    name: str = "mesh-texture"
    mesh: str = Field("sphere", description="a mesh file (OBJ, PLY, GLB/GLTF, STL, OFF) or a primitive: sphere, "
                      "cube, torus, cylinder")
    scale: float = Field(0.6, gt=0, le=1, description="radius of the normalized mesh's bounding sphere")
    shading: Literal["albedo", "lambertian"] = Field("albedo", description="albedo: the colour itself; lambertian: "
                                                     "lit by a light near the camera (random each step)")
    ambient: float = Field(0.1, ge=0, le=1, description="ambient share of the light (lambertian)")
    texture_size: int = Field(256, ge=8, le=4096, description="texture.png's pixels per side (meshes with UVs)")


class MeshTexture(SceneParameterization):
    """A colour field on the surface of a fixed mesh, seen from :attr:`camera`."""

    class Config(MeshTextureOptions):
        pass

    @classmethod
    def check(cls, config, recipe, model) -> list[str] | None:
        super().check(config, recipe, model)
        try:
            load_mesh(config.mesh)
        except MeshError as exc:
            raise InvalidConfig(str(exc), field="mesh") from None
        return None

    def __init__(self, config, ctx):
        super().__init__(config, ctx)
        self.render_size = config.render_size or self.out_size  # casting is cheap: no upsampling by default
        self.source = load_mesh(config.mesh)
        self.mesh = normalized(self.source, config.scale * RADIUS)
        g = ctx.generator
        self.encoding = HashGridEncoding(config.grid, device=ctx.device, generator=g, n_input_dims=3)
        self.mlp = nn.Sequential(nn.Linear(self.encoding.n_output_dims, config.hidden_width), nn.ReLU(),
                                 nn.Linear(config.hidden_width, 3)).to(ctx.device)
        seeded(list(self.mlp), g)
        self.face_normals = torch.from_numpy(np.asarray(self.mesh.face_normals, dtype=np.float32)).to(ctx.device)

    def field(self, points: torch.Tensor) -> torch.Tensor:
        """RGB in [0, 1] ``[N, 3]`` at surface ``points``."""
        return torch.sigmoid(self.mlp(self.encoding(((points / RADIUS + 1) / 2).clamp(0, 1))))

    def render(self, camera: Camera, size: int, jitter: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        origins, directions = camera.rays(size, device=self.encoding.params.device)
        hit, points, faces = cast(self.mesh, origins, directions)
        colour = self.field(points[hit])
        if self.config.shading == "lambertian":
            colour = self._lit(colour, self.face_normals[faces[hit]], camera, jitter)
        background = self.background(directions).expand(len(directions), 3)
        pixels = torch.where(hit[:, None], torch.zeros_like(background), background)
        pixels = pixels.index_put((hit.nonzero()[:, 0],), colour, accumulate=True)
        return pixels.t().reshape(1, 3, size, size), {"hit": hit}

    def _lit(self, colour: torch.Tensor, normals: torch.Tensor, camera: Camera, jitter: bool) -> torch.Tensor:
        light = self.light(camera, jitter, colour.device)
        diffuse = (normals * light).sum(-1, keepdim=True).abs()  # either side of the surface
        return colour * (self.config.ambient + (1 - self.config.ambient) * diffuse)

    # -- export
    def textured(self):
        """(the input mesh with vertex colours, the same with a UV texture or None)."""
        import trimesh
        from PIL import Image

        vertices = torch.from_numpy(np.asarray(self.mesh.vertices, dtype=np.float32)).to(self.encoding.params.device)
        with torch.no_grad():
            colours = torch.cat([self.field(chunk) for chunk in vertices.split(65536)]).cpu().numpy()
        rgba = np.concatenate([(colours * 255).round().astype(np.uint8), np.full((len(colours), 1), 255, np.uint8)], 1)
        coloured = trimesh.Trimesh(self.source.vertices, self.source.faces, vertex_colors=rgba, process=False)
        uv = getattr(self.source.visual, "uv", None)
        if uv is None or len(uv) != len(self.source.vertices):
            return coloured, None
        image = Image.fromarray(self.bake(np.asarray(uv, dtype=np.float64)))
        material = trimesh.visual.material.SimpleMaterial(image=image)
        visual = trimesh.visual.TextureVisuals(uv=uv, image=image, material=material)
        return coloured, trimesh.Trimesh(self.source.vertices, self.source.faces, visual=visual, process=False)

    def bake(self, uv: np.ndarray) -> np.ndarray:
        """The colour field in UV space, ``[S, S, 3]`` uint8 (row 0 at v = 1): each texel's
        centre is located in the UV layout (rays cast onto it), its barycentric coordinates give
        the surface point; texels no triangle covers take the mean colour."""
        import trimesh

        n = self.config.texture_size
        flat = trimesh.Trimesh(np.column_stack([uv, np.zeros(len(uv))]), self.mesh.faces, process=False)
        centres = (np.arange(n) + 0.5) / n
        u, v = np.meshgrid(centres, 1 - centres)
        origins = np.column_stack([u.ravel(), v.ravel(), np.ones(n * n)])
        locations, texels, faces = flat.ray.intersects_location(origins, np.tile([0.0, 0.0, -1.0], (n * n, 1)),
                                                                multiple_hits=False)
        weights = trimesh.triangles.points_to_barycentric(flat.triangles[faces], locations)
        points = (self.mesh.triangles[faces] * weights[:, :, None]).sum(axis=1)
        device = self.encoding.params.device
        with torch.no_grad():
            colours = self.field(torch.from_numpy(points.astype(np.float32)).to(device)).cpu().numpy()
        texture = np.tile(colours.mean(axis=0) if len(colours) else np.full(3, 0.5), (n * n, 1))
        texture[texels] = colours
        return (texture.reshape(n, n, 3) * 255).round().astype(np.uint8)
