"""Meshes a 3D recipe brings: reading them (trimesh), the built-in primitives, normalizing them
into the bounding sphere, and finding where camera rays hit them.

``mesh: PATH`` reads an OBJ, PLY, GLB/GLTF, STL or OFF file with trimesh (a scene's geometries
are joined into one mesh); ``mesh: sphere | cube | torus | cylinder`` builds a primitive at run
time (no binary assets). Every problem a file can have -- missing, not a mesh, a point cloud,
no faces, more faces than :data:`FACE_LIMIT` -- is one :class:`MeshError` with its fix.

Ray casting uses trimesh's intersector: Embree (``embreex``, a dependency on x86-64) where it
is installed, else its rtree-accelerated triangle test (about 200 times slower: 310 ms against
1.6 ms for a 32×32 view of the sphere). The hits carry no gradient: the geometry does not move.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import trimesh
    from torch import Tensor

#: the most faces a mesh may have: ray casting on the CPU slows with the face count
FACE_LIMIT = 500_000
SUFFIXES = (".obj", ".ply", ".glb", ".gltf", ".stl", ".off")


class MeshError(ValueError):
    """A mesh that cannot be used, with what to do about it."""


def _primitives() -> dict[str, Callable[[], trimesh.Trimesh]]:
    import trimesh

    return {
        "sphere": lambda: trimesh.creation.icosphere(subdivisions=4),
        "cube": lambda: trimesh.creation.box(),
        "torus": lambda: trimesh.creation.torus(major_radius=0.6, minor_radius=0.25),
        "cylinder": lambda: trimesh.creation.cylinder(radius=0.5, height=1.2, sections=64),
    }


PRIMITIVES = ("sphere", "cube", "torus", "cylinder")


def is_primitive_name(spec: str) -> bool:
    """A bare word (no folder, no file suffix) names a primitive; anything else is a path."""
    return "/" not in spec and "\\" not in spec and not Path(spec).suffix


def load_mesh(spec: str) -> trimesh.Trimesh:
    """The mesh ``spec`` names (a primitive or a file), as one ``trimesh.Trimesh``."""
    if is_primitive_name(spec):
        if spec not in PRIMITIVES:
            close = difflib.get_close_matches(spec, PRIMITIVES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise MeshError(f"unknown primitive {spec!r}{hint}; primitives: {', '.join(PRIMITIVES)}, "
                            "or give a mesh file (OBJ, PLY, GLB/GLTF, STL, OFF)")
        return _primitives()[spec]()
    return _read(Path(spec).expanduser())


def _read(path: Path) -> trimesh.Trimesh:
    import trimesh

    if not path.is_file():
        raise MeshError(f"mesh file {path} not found; give an existing OBJ, PLY, GLB/GLTF, STL or OFF file, "
                        f"or a primitive: {', '.join(PRIMITIVES)}")
    if path.suffix.lower() not in SUFFIXES:
        raise MeshError(f"{path} is not a mesh file trimesh reads here ({', '.join(SUFFIXES)}); "
                        "convert it to one of them")
    try:
        loaded = trimesh.load(path, process=False)
    except Exception as exc:
        raise MeshError(f"{path} could not be read as a mesh ({type(exc).__name__}: {exc}); "
                        "check that the file is a valid mesh of its format") from None
    if isinstance(loaded, trimesh.Scene):
        geometries = [g for g in loaded.dump() if isinstance(g, trimesh.Trimesh)] if loaded.geometry else []
        loaded = trimesh.util.concatenate(geometries) if geometries else trimesh.Trimesh()
    if isinstance(loaded, trimesh.PointCloud):
        raise MeshError(f"{path} holds a point cloud ({len(loaded.vertices)} points, no faces); texturing needs "
                        "a surface: reconstruct one first (e.g. Poisson reconstruction in MeshLab or Open3D)")
    if not isinstance(loaded, trimesh.Trimesh) or len(loaded.faces) == 0:
        raise MeshError(f"{path} has no faces (an empty mesh); give a mesh with triangles")
    if len(loaded.faces) > FACE_LIMIT:
        raise MeshError(f"{path} has {len(loaded.faces):,} faces, more than the limit of {FACE_LIMIT:,}; decimate "
                        "it first (trimesh's simplify_quadric_decimation, or Blender's Decimate modifier)")
    return loaded


def normalized(mesh: trimesh.Trimesh, radius: float) -> trimesh.Trimesh:
    """A copy of ``mesh`` centred on its bounding box's centre and scaled so that its farthest
    vertex lies ``radius`` from the origin (UV coordinates and faces unchanged)."""
    out = mesh.copy()
    out.apply_translation(-out.bounds.mean(axis=0))
    far = float((out.vertices ** 2).sum(axis=1).max() ** 0.5)
    if far > 0:
        out.apply_scale(radius / far)
    return out


def intersector_name(mesh: trimesh.Trimesh) -> str:
    """``embree`` or ``rtree``: which of trimesh's ray intersectors casts the rays."""
    return "embree" if "embree" in type(mesh.ray).__module__ else "rtree"


def cast(mesh: trimesh.Trimesh, origins: Tensor, directions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Where rays first hit ``mesh``: (hit ``[N]`` bool, points ``[N, 3]`` float32, zero where
    missed, face ``[N]`` int64, -1 where missed), on the rays' device; no gradients."""
    import numpy as np
    import torch

    o = origins.detach().cpu().double().numpy()
    d = directions.detach().cpu().double().numpy()
    locations, rays, faces = mesh.ray.intersects_location(o, d, multiple_hits=False)
    hit = np.zeros(len(o), dtype=bool)
    points = np.zeros((len(o), 3), dtype=np.float32)
    face = np.full(len(o), -1, dtype=np.int64)
    hit[rays] = True
    points[rays] = locations
    face[rays] = faces
    device = origins.device
    return torch.from_numpy(hit).to(device), torch.from_numpy(points).to(device), torch.from_numpy(face).to(device)
