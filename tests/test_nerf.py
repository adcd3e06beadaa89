"""3D runs (docs/3d.md): the ``nerf`` parameterization, ``orbit`` cameras, a 3D run's outputs,
``render`` and ``export``, resume, and the bad-input rows of issue 39."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from conftest import run_interrupted_after

#: a small 3D recipe on the tiny prior: every 3D path, in seconds
SMALL = {
    "steps": 4,
    "parameterization": {"name": "nerf", "render_size": 8, "samples": 8, "mesh_resolution": 20},
    "cameras": {"name": "orbit", "eval_views": 3},
    "output": {"preview_every": 2, "view_size": 0},
}


def small(recipe_file, **changes):
    data = json.loads(json.dumps(SMALL))
    for key, value in changes.items():
        section, _, option = key.partition("__")
        if option:
            data.setdefault(section, {})[option] = value
        else:
            data[section] = value
    return recipe_file(data)


def records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_nerf_run_writes_views_turntable_mesh_and_per_view_metrics(cli, recipe_file, tmp_path):
    import imageio.v3 as iio
    import trimesh

    result = cli("run", small(recipe_file), "--out", tmp_path / "run", "--no-live")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert [v["camera"]["azimuth"] for v in summary["views"]] == [0.0, 120.0, -120.0]
    for view in summary["views"]:
        assert (run / view["file"]).is_file() and "shapes-judge" in view["metrics"]
    share = summary["view_metrics"]["shapes-judge"]["match"]
    assert share["views"] == 3 and share["share"] == share["count"] / 3
    assert summary["metrics"]["shapes-judge"] == summary["views"][0]["metrics"]["shapes-judge"]  # final.png: the front
    assert iio.improps(run / "turntable.gif", index=None).shape[0] >= 24
    assert (run / "views.png").is_file()
    mesh = trimesh.load(run / "mesh.ply", process=False)
    assert len(mesh.faces) == summary["mesh"]["faces"] > 0
    assert mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
    glb = trimesh.load(run / "mesh.glb", force="mesh", process=False)
    assert len(glb.vertices) == len(mesh.vertices)
    assert all("camera" in r for r in records(run))
    assert "camera az" in result.output  # the log line shows the step's camera
    assert "(3D: views.png, turntable.gif, mesh.glb in" in result.output


def test_gradients_reach_every_field_parameter(recipe_file):
    from sdsctl.engine.loop import Optimization, load_prior
    from sdsctl.engine.recipe import load_recipe

    path = small(recipe_file, parameterization__background="view", parameterization__shading="lambertian",
                 parameterization__sparsity_weight=0.1, parameterization__entropy_weight=0.1,
                 parameterization__orientation_weight=0.1)
    loaded = load_recipe(path)
    device, dtype = torch.device("cpu"), torch.float32
    opt = Optimization(loaded, load_prior(loaded, device, dtype), device, dtype)
    opt.initialize()
    before = {name: p.detach().clone() for name, p in opt.param.named_parameters()}
    record = opt.step(0)
    assert "regularizer" in record.names
    for name, p in opt.param.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert not torch.equal(p.detach(), before[name]), name


def test_a_3d_run_interrupted_and_resumed_matches_an_uninterrupted_run(cli, recipe_file, tmp_path, monkeypatch):
    path = small(recipe_file, steps=6)
    assert cli("run", path, "--out", tmp_path / "full", "--no-live").exit_code == 0
    result = run_interrupted_after(path, tmp_path / "part", 3, monkeypatch)
    assert (result.status, result.steps_done) == ("interrupted", 3)
    assert cli("resume", tmp_path / "part", "--no-live").exit_code == 0
    full, part = records(tmp_path / "full"), records(tmp_path / "part")
    assert part == full and len({r["camera"]["azimuth"] for r in full}) == 6
    for name in ("final.png", "views/az000_el15.png", "mesh.ply"):
        assert (tmp_path / "part" / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name


def test_latent_nerf_renders_latents_and_colours_its_mesh_through_the_decoder(cli, recipe_file, tmp_path):
    import trimesh

    path = small(recipe_file, parameterization__space="latent", parameterization__render_size=None)
    assert cli("run", path, "--out", tmp_path / "run", "--no-live").exit_code == 0
    recipe = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert recipe["parameterization"]["space"] == "latent"
    mesh = trimesh.load(tmp_path / "run" / "mesh.ply", process=False)
    colours = mesh.visual.vertex_colors[:, :3]
    assert colours.std(axis=0).sum() > 0  # a fitted linear reading, not one flat colour


def test_render_and_export_a_3d_run(cli, recipe_file, tmp_path):
    import trimesh

    assert cli("run", small(recipe_file), "--out", tmp_path / "run", "--no-live").exit_code == 0
    result = cli("render", tmp_path / "run", "--azimuth", "0,90", "--elevation", "30", "--size", "12",
                 "--out", tmp_path / "pics")
    assert result.exit_code == 0, result.output

    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["az000_el30_d2.3.png", "az090_el30_d2.3.png",
                                                                       "sheet.png"]
    assert Image.open(tmp_path / "pics" / "az090_el30_d2.3.png").size == (12, 12)
    for fmt in ("obj", "ply", "glb"):
        out = tmp_path / f"m.{fmt}"
        result = cli("export", tmp_path / "run", "--format", fmt, "--out", out)
        assert result.exit_code == 0, result.output
        mesh = trimesh.load(out, force="mesh", process=False)
        assert len(mesh.faces) > 0 and mesh.visual.kind == "vertex"


def test_render_and_export_refuse_a_2d_run_and_an_empty_folder(cli, recipe_file, tmp_path):
    assert cli("run", recipe_file(), "--out", tmp_path / "flat", "--no-live").exit_code == 0
    (tmp_path / "empty").mkdir()
    before = sorted(p.name for p in (tmp_path / "flat").iterdir())
    for args in (("render", tmp_path / "flat"), ("export", tmp_path / "flat")):
        result = cli(*args)
        assert result.exit_code == 2 and "is a 2D run" in result.output and "Traceback" not in result.output
    for args in (("render", tmp_path / "empty"), ("export", tmp_path / "empty"), ("render", tmp_path / "none")):
        result = cli(*args)
        assert result.exit_code == 2 and ("not a run directory" in result.output or "not found" in result.output)
    assert sorted(p.name for p in (tmp_path / "flat").iterdir()) == before
    assert list((tmp_path / "empty").iterdir()) == []


@pytest.mark.parametrize("change,message", [
    ({"cameras__elevation_range": [-10, 95]}, "elevations must lie in [-90, 90]"),
    ({"cameras__fov_range": [0, 60]}, "strictly between 0 and 180"),
    ({"cameras__eval_fov": 180}, "strictly between 0 and 180"),
    ({"cameras__distance_range": [0.8, 2.0]}, "beyond the bounding sphere"),
    ({"cameras__eval_views": 0}, "eval_views must be at least 1"),
    ({"parameterization__render_size": 4096}, "larger than the model's resolution"),
    ({"parameterization__space": "latent", "parameterization__shading": "lambertian"}, "use shading: albedo"),
    ({"cameras__view_prompts": True}, "view_prompts"),
])
def test_bad_3d_input_is_one_clear_message_and_nothing_written(cli, recipe_file, tmp_path, change, message):
    result = cli("run", small(recipe_file, **change), "--out", tmp_path / "run", "--no-live")
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_cameras_on_a_2d_recipe_are_refused(cli, recipe_file, tmp_path):
    result = cli("validate", recipe_file({"cameras": {"name": "orbit"}}))
    assert result.exit_code == 2 and "cameras are for 3D parameterizations" in result.output


def test_latent_space_on_a_pixel_model_is_refused(cli, recipe_file, tiny_families, tmp_path):
    path = recipe_file({**SMALL, "model": str(tiny_families["if"]),
                        "parameterization": {**SMALL["parameterization"], "space": "latent"}})
    result = cli("validate", path)
    assert result.exit_code == 2 and "space: rgb" in result.output


def test_2d_recipes_keep_their_resolved_form(recipe_file):
    """A 2D recipe has no cameras: its recipe.yaml reads as before 3D existed."""
    from sdsctl.engine.recipe import load_recipe, to_yaml

    loaded = load_recipe(recipe_file())
    assert loaded.recipe.cameras is None and "cameras" not in loaded.components
    assert "cameras" not in yaml.safe_load(to_yaml(loaded.recipe))


def test_view_prompts_give_each_view_its_words(recipe_file, tiny_prior, monkeypatch):
    """With ``view_prompts`` the step's guidance is the one built on ``<prompt>, <word> view``
    for the step's camera (DreamFusion), and a guidance with state of its own is refused."""
    from sdsctl.cameras import view_word
    from sdsctl.engine.loop import Optimization, load_prior
    from sdsctl.engine.recipe import load_recipe
    from sdsctl.errors import RecipeError

    monkeypatch.setattr("sdsctl.modelinfo.ModelInfo.unknown_words", lambda self, text: [])  # a model knowing them
    path = small(recipe_file, cameras__view_prompts=True, steps=8)
    loaded = load_recipe(path)
    device = torch.device("cpu")
    opt = Optimization(loaded, load_prior(loaded, device, torch.float32), device, torch.float32)
    opt.initialize()
    assert sorted(opt.view_guidances) == ["back", "front", "overhead", "side"]
    assert opt.view_guidances["side"].ctx.recipe.prompt == "a red circle on a blue background, side view"
    used = []
    for word, guidance in opt.view_guidances.items():
        original = guidance.score
        monkeypatch.setattr(guidance, "score", lambda z, t, w=word, f=original: used.append(w) or f(z, t))
    for k in range(8):
        opt.step(k)
        assert used[-1] == view_word(opt.param.camera)
    with pytest.raises(RecipeError, match="keeps state of its own"):
        load_recipe(small(recipe_file, cameras__view_prompts=True, guidance={"name": "vsd"}))


def test_bench_times_the_renderer_apart_from_the_model(cli, recipe_file):
    result = cli("bench", small(recipe_file), "--steps", "2", "--warmup", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["renderer_ms"]["forward"] > 0 and report["renderer_ms"]["backward"] > 0
    assert report["breakdown_ms"]["render"] > 0


@pytest.mark.parametrize("family,recipe", [("sd1", "nerf_robust_nfsd"), ("sd2", "nerf_latent_robust_nfsd"),
                                           ("sdxl", "nerf_sds"), ("if", "nerf_robust_nfsd")])
def test_the_3d_recipes_run_on_other_families(cli, tiny_families, tmp_path, family, recipe):
    """The bundled 3D recipes with ``--model``: latents through the VAE (SD 1.x, SDXL), latents
    rendered directly (SD 2.x, v-prediction), RGB straight into a pixel model (DeepFloyd IF)."""
    sets = ["steps=2", "parameterization.samples=4", "parameterization.mesh_resolution=16", "cameras.eval_views=2",
            "output.view_size=0", "parameterization.render_size=8"]
    if recipe == "nerf_latent_robust_nfsd":
        sets[-1] = "parameterization.render_size=4"
    args = [a for s in sets for a in ("--set", s)]
    result = cli("run", recipe, "--model", tiny_families[family], *args, "--out", tmp_path / "run", "--no-live")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and len(summary["views"]) == 2
    assert (tmp_path / "run" / "turntable.gif").is_file()


def test_the_background_learns_background_lr_times_faster(recipe_file):
    """Adam's first step moves every value by about its learning rate: the background's by
    ``background_lr`` × ``optimizer.lr``, the field's by ``optimizer.lr``."""
    from sdsctl.engine.loop import Optimization, load_prior
    from sdsctl.engine.recipe import load_recipe

    loaded = load_recipe(small(recipe_file, parameterization__background_lr=10.0))
    device = torch.device("cpu")
    opt = Optimization(loaded, load_prior(loaded, device, torch.float32), device, torch.float32)
    opt.initialize()
    lr = loaded.recipe.optimizer.lr
    before = {name: p.detach().clone() for name, p in opt.param.named_parameters()}
    opt.step(0)
    moved = {name: float((p.detach() - before[name]).abs().max()) for name, p in opt.param.named_parameters()}
    assert moved["background_colour"] == pytest.approx(10 * lr, rel=0.01)
    assert moved["mlp.2.bias"] == pytest.approx(lr, rel=0.01)
    assert [len(g["params"]) for g in opt.optimizer.param_groups] == [len(before) - 1, 1]


def test_compare_mixes_2d_and_3d_recipes_and_counts_views(cli, recipe_file, tmp_path):
    """A 3D row counts its held-out views (``2/4 views``), carries each view's readings in
    compare.json, and shows its turntable, animated and embedded, and its worst view in the report."""
    flat = recipe_file({"steps": 2}, name="flat.yaml")
    scene = small(recipe_file, steps=2)
    scene = scene.rename(tmp_path / "scene.yaml")
    result = cli("compare", flat, scene, "--pairs", "2", "--out", tmp_path / "cmp", "--no-live")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    flat_row, scene_row = data["flat"], data["scene"]
    assert flat_row["summary"]["unit"] == "runs" and scene_row["summary"]["unit"] == "views"
    assert scene_row["summary"]["judged"] == 2 * 3 and len(scene_row["runs"][0]["views"]) == 3
    assert "shapes-judge" in scene_row["runs"][0]["views"][0]["metrics"]
    worst = scene_row["summary"]["worst_view"]
    assert worst["file"].endswith(".png") and set(worst["camera"]) == {"azimuth", "elevation", "distance", "fov"}
    matches = scene_row["summary"]["matches"]
    assert f"| scene | {matches}/6 views" in (tmp_path / "cmp" / "compare.md").read_text()
    page = (tmp_path / "cmp" / "report.html").read_text()
    turntables = re.findall(r'<img src="data:image/webp;base64,([^"]+)" width="96"', page)
    views = re.findall(r'<img src="data:image/webp;base64,[^"]+" width="24"', page)
    assert len(turntables) == 2 and len(views) == 2 * 3 and "worst view" in page
    embedded = turntables[0]
    with Image.open(io.BytesIO(base64.b64decode(embedded))) as shown:  # scaled to the cell
        assert shown.size == (96, 96)
    assert "views match" in page or "views miss" in page or "/3 views" in page


def test_the_report_embeds_a_turntable_scaled_with_every_frame(tmp_path):
    """``turntable_uri``: the GIF a run writes becomes an animated WebP at the cell's size, frame
    for frame (a 144-run page embedding the GIFs themselves weighed 100 MB)."""
    from sdsctl.experiments.report import turntable_uri

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]
    frames = [Image.new("RGB", (256, 256), c) for c in colours]
    frames[0].save(tmp_path / "turntable.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    uri = turntable_uri(tmp_path / "turntable.gif", 96)
    assert uri.startswith("data:image/webp;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as shown:
        assert shown.size == (96, 96) and shown.n_frames == len(colours)
        for i, colour in enumerate(colours):
            shown.seek(i)
            centre = shown.convert("RGB").getpixel((48, 48))
            assert max(abs(a - b) for a, b in zip(centre, colour)) < 24  # lossy, but that frame's colour


def test_doctor_reads_a_3d_run_view_by_view(cli, recipe_file, tmp_path):
    """doctor's multi-view checks: an empty view, the object at the frame, a view the judge
    reads differently, floaters in the mesh -- each found on a doctored copy of a run."""
    import shutil

    import trimesh

    assert cli("run", small(recipe_file), "--out", tmp_path / "run", "--no-live").exit_code == 0
    report = json.loads(cli("doctor", tmp_path / "run", "--json").output)
    checks = {f["check"]: f for f in report["findings"]}
    assert {"views-empty", "views-frame", "views-agree", "floaters"} <= set(checks)
    assert checks["convergence"]["ok"] is None  # previews are views from different cameras

    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "run", bad)
    summary = json.loads((bad / "summary.json").read_text())
    views = summary["views"]
    size = Image.open(bad / views[0]["file"]).size
    Image.new("RGB", size, (0, 0, 255)).save(bad / views[0]["file"])  # nothing but background
    frame = Image.new("RGB", size, (255, 0, 0))
    frame.paste((0, 0, 255), (0, 0, 4, 4))  # corners background, the object everywhere else
    for box in [(size[0] - 4, 0, size[0], 4), (0, size[1] - 4, 4, size[1]), (size[0] - 4, size[1] - 4, *size)]:
        frame.paste((0, 0, 255), box)
    frame.save(bad / views[1]["file"])
    views[2]["metrics"]["shapes-judge"]["shape"] = "hexagon"  # one view read differently
    (bad / "summary.json").write_text(json.dumps(summary))
    two = trimesh.util.concatenate([trimesh.creation.icosphere(radius=0.4),
                                    trimesh.creation.icosphere(radius=0.2).apply_translation([0.8, 0, 0])])
    two.export(bad / "mesh.ply")
    report = json.loads(cli("doctor", bad, "--json").output)
    checks = {f["check"]: f for f in report["findings"]}
    assert checks["views-empty"]["ok"] is False and "az 0" in checks["views-empty"]["evidence"]
    assert checks["views-frame"]["ok"] is False and "distance_range" in checks["views-frame"]["knob"]
    assert checks["views-agree"]["ok"] is False and "'hexagon'" in checks["views-agree"]["evidence"]
    assert checks["floaters"]["ok"] is False and "sparsity_weight" in checks["floaters"]["knob"]
    assert report["healthy"] is False


def test_render_size_means_pixels_for_a_latent_scene_too(cli, recipe_file, tmp_path):

    path = small(recipe_file, parameterization__space="latent", parameterization__render_size=None)
    assert cli("run", path, "--out", tmp_path / "run", "--no-live").exit_code == 0
    assert cli("render", tmp_path / "run", "--azimuth", "30", "--size", "32", "--out", tmp_path / "pics").exit_code == 0
    (picture,) = [p for p in (tmp_path / "pics").iterdir() if p.name != "sheet.png"]
    assert Image.open(picture).size == (32, 32)
    final = Image.open(tmp_path / "run" / "final.png")
    assert final.size == Image.open(tmp_path / "run" / "views" / "az000_el15.png").size
