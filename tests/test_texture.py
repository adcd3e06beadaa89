"""Textures painted on a given mesh (docs/3d.md): the ``mesh-texture`` parameterization, its
exports (vertex colours, a UV texture), and the bad meshes of issue 40."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

SMALL = {
    "steps": 3,
    "parameterization": {"name": "mesh-texture", "mesh": "sphere", "render_size": 8, "texture_size": 16},
    "cameras": {"name": "orbit", "eval_views": 2},
    "output": {"preview_every": 3, "view_size": 0},
}


def small(recipe_file, **parameterization):
    data = json.loads(json.dumps(SMALL))
    data["parameterization"].update(parameterization)
    return recipe_file(data)


def uv_mesh(path: Path) -> Path:
    """A bent sheet (a 5×5 height field) whose UV layout is its (x, y) footprint: no two
    triangles overlap in UV space. Written as OBJ."""
    import trimesh

    x, y = np.meshgrid(np.linspace(0, 1, 5), np.linspace(0, 1, 5))
    z = 0.3 * np.sin(3 * x) * np.cos(2 * y)
    vertices = np.column_stack([x.ravel(), y.ravel(), z.ravel()])
    faces = []
    for i in range(4):
        for j in range(4):
            a, b, c, d = i * 5 + j, i * 5 + j + 1, (i + 1) * 5 + j, (i + 1) * 5 + j + 1
            faces += [[a, b, d], [a, d, c]]
    sheet = trimesh.Trimesh(vertices, np.array(faces), process=False)
    sheet.visual = trimesh.visual.TextureVisuals(uv=vertices[:, :2].copy())
    sheet.export(path)
    return path


def test_a_texture_run_writes_views_and_the_mesh_with_its_colours(cli, recipe_file, tmp_path):
    import trimesh

    result = cli("run", small(recipe_file), "--out", tmp_path / "run", "--no-live")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert len(summary["views"]) == 2 and summary["mesh"]["faces"] == 5120  # the icosphere's, unchanged
    mesh = trimesh.load(tmp_path / "run" / "mesh.glb", force="mesh", process=False)
    assert len(mesh.faces) == 5120 and mesh.visual.kind == "vertex"
    assert not (tmp_path / "run" / "texture.png").exists()  # a primitive has no UVs
    assert (tmp_path / "run" / "turntable.gif").is_file()


def test_a_users_obj_with_uvs_gets_a_texture_and_keeps_its_coordinates(cli, recipe_file, tmp_path):
    import trimesh
    from PIL import Image

    obj = uv_mesh(tmp_path / "box.obj")
    result = cli("run", small(recipe_file, mesh=str(obj)), "--out", tmp_path / "run", "--no-live")
    assert result.exit_code == 0, result.output
    assert Image.open(tmp_path / "run" / "texture.png").size == (16, 16)
    glb = trimesh.load(tmp_path / "run" / "mesh.glb", force="mesh", process=False)
    assert glb.visual.kind == "texture" and glb.visual.material.baseColorTexture.size == (16, 16)
    source = trimesh.load(obj, force="mesh", process=False)
    ply = trimesh.load(tmp_path / "run" / "mesh.ply", process=False)
    assert np.allclose(np.sort(ply.vertices, axis=0), np.sort(source.vertices, axis=0), atol=1e-6)
    assert ply.visual.kind == "vertex"


def test_the_uv_bake_puts_each_texel_at_its_surface_point(recipe_file, tmp_path):
    """With a colour field that is the position itself, a covered texel's colour is the surface
    point its UV coordinates name (checked at each face's UV centroid); uncovered texels take
    the mean colour."""
    from sdsctl.engine.loop import Optimization, load_prior
    from sdsctl.engine.recipe import load_recipe

    obj = uv_mesh(tmp_path / "box.obj")
    loaded = load_recipe(small(recipe_file, mesh=str(obj), texture_size=64))
    device = torch.device("cpu")
    param = Optimization(loaded, load_prior(loaded, device, torch.float32), device, torch.float32).param
    param.field = lambda points: (points / 1.2 + 0.5).clamp(0, 1)  # RGB = the position
    uv = np.asarray(param.source.visual.uv)
    texture = param.bake(uv).astype(np.float64) / 255
    n, checked = 64, 0
    for face in range(len(param.mesh.faces)):
        corners = param.mesh.faces[face]
        centre_uv = uv[corners].mean(axis=0)
        col, row = int(centre_uv[0] * n), int((1 - centre_uv[1]) * n)
        expected = np.clip(param.mesh.vertices[corners].mean(axis=0) / 1.2 + 0.5, 0, 1)
        if np.allclose(texture[row, col], expected, atol=0.06):
            checked += 1
    assert checked == len(param.mesh.faces)
    assert len(np.unique(texture.reshape(-1, 3), axis=0)) > 20


def test_gradients_reach_only_the_colour_field_and_the_background(recipe_file):
    from sdsctl.engine.loop import Optimization, load_prior
    from sdsctl.engine.recipe import load_recipe

    loaded = load_recipe(small(recipe_file, shading="lambertian"))
    device = torch.device("cpu")
    opt = Optimization(loaded, load_prior(loaded, device, torch.float32), device, torch.float32)
    opt.initialize()
    opt.step(0)
    names = {name for name, _ in opt.param.named_parameters()}
    assert names == {"background_colour", "encoding.params", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight",
                     "mlp.2.bias"}
    for name, p in opt.param.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_the_sphere_seen_from_the_front_covers_its_disc(recipe_file):
    """The cast rays hit exactly where the geometry says: a sphere of radius 0.6 at distance
    2.3 with a 55° field of view covers π·ρ²/4 of the picture, ρ = tan(asin(0.6/2.3))/tan(27.5°)."""
    import math

    from sdsctl.cameras import Camera
    from sdsctl.meshes import cast, load_mesh, normalized

    mesh = normalized(load_mesh("sphere"), 0.6)
    origins, directions = Camera(azimuth=0, elevation=15, distance=2.3, fov=55).rays(64)
    hit, points, faces = cast(mesh, origins, directions)
    rho = math.tan(math.asin(0.6 / 2.3)) / math.tan(math.radians(27.5))
    assert abs(float(hit.float().mean()) - math.pi * rho**2 / 4) < 0.01
    assert torch.allclose(points[hit].norm(dim=-1), torch.tensor(0.6), atol=0.01)  # on the surface
    assert bool((faces[hit] >= 0).all()) and bool((faces[~hit] == -1).all())


@pytest.mark.parametrize("mesh,message", [
    ("missing.obj", "not found"),
    ("notes.txt", "is not a mesh file"),
    ("empty.obj", "has no faces"),
    ("cloud.ply", "point cloud"),
    ("spher", "did you mean 'sphere'"),
    ("pyramid", "unknown primitive 'pyramid'"),
])
def test_bad_meshes_are_one_clear_message_and_nothing_written(cli, recipe_file, tmp_path, mesh, message):
    import trimesh

    (tmp_path / "notes.txt").write_text("not a mesh")
    (tmp_path / "empty.obj").write_text("# nothing\n")
    trimesh.PointCloud(np.random.default_rng(0).random((50, 3))).export(tmp_path / "cloud.ply")
    spec = str(tmp_path / mesh) if "." in mesh else mesh
    result = cli("run", small(recipe_file, mesh=spec), "--out", tmp_path / "run", "--no-live")
    assert result.exit_code == 2, result.output
    assert message in result.output and "parameterization.mesh" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_a_mesh_over_the_face_limit_says_the_limit_and_how_to_decimate(cli, recipe_file, tmp_path, monkeypatch):
    import trimesh

    monkeypatch.setattr("sdsctl.meshes.FACE_LIMIT", 100)
    trimesh.creation.icosphere(subdivisions=2).export(tmp_path / "ball.stl")
    result = cli("validate", small(recipe_file, mesh=str(tmp_path / "ball.stl")))
    assert result.exit_code == 2 and "320 faces, more than the limit of 100" in result.output
    assert "decimate" in result.output
