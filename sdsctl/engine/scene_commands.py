"""Commands ``render`` and ``export``: a 3D run seen from any cameras, its mesh in a file.

Both read a finished or interrupted run (its ``recipe.yaml`` and ``state.pt``), load its model
(a latent field needs the VAE decoder for its pictures and colours) and rebuild the scene from
the saved θ; neither changes the run directory unless ``--out`` points into it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

import sdsctl
from sdsctl.errors import SdsctlError


def open_scene(run_dir: Path):
    """(parameterization with the run's θ, cameras component, recipe) of the 3D run in ``run_dir``."""
    import torch

    from sdsctl.components import RunContext
    from sdsctl.engine.loop import load_prior, placement
    from sdsctl.engine.recipe import load_recipe
    from sdsctl.engine.rundir import RunDir, is_run_dir

    if not run_dir.is_dir():
        raise SdsctlError(f"run directory {run_dir} not found")
    if not is_run_dir(run_dir):
        raise SdsctlError(f"{run_dir} is not a run directory (it has no recipe.yaml); "
                          "give the folder a `sdsctl run` of a 3D recipe wrote")
    loaded = load_recipe(run_dir / "recipe.yaml")
    recipe = loaded.recipe
    param_cls = loaded.components["parameterization"].obj
    if not getattr(param_cls, "scene", False):
        raise SdsctlError(f"{run_dir} is a 2D run (parameterization {recipe.parameterization.name!r} renders one "
                          "view); render and export need a 3D run, e.g. sdsctl run nerf_robust_nfsd")
    state = RunDir(run_dir).load_state()
    if state is None:
        raise SdsctlError(f"{run_dir} has no state.pt yet (the run saved no step); let it run past its first "
                          "checkpoint or resume it")
    device, dtype, _ = placement(recipe)
    prior = load_prior(loaded, device, dtype)
    generator = torch.Generator(device=device).manual_seed(recipe.seed)
    ctx = RunContext(prior=prior, recipe=recipe, device=device, dtype=dtype, generator=generator, steps=recipe.steps)
    param = param_cls(recipe.parameterization, ctx).to(device)
    param.load_state_dict(state["param"])
    param.eval()
    cameras = loaded.components["cameras"].obj(recipe.cameras, ctx)
    return param, cameras, recipe


def _floats(text: str, option: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SdsctlError(f"{option} {text!r}: expected numbers separated by commas, e.g. {option} 0,90,180") from None


def render(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="A finished or interrupted 3D run directory.")],
    azimuth: Annotated[Optional[str], typer.Option(
        "--azimuth", help="Azimuths in degrees, comma-separated (default: the run's held-out views).")] = None,
    elevation: Annotated[Optional[float], typer.Option(
        help="Elevation in degrees (default: the held-out views').")] = None,
    distance: Annotated[Optional[float], typer.Option(help="Camera distance (default: the held-out views').")] = None,
    size: Annotated[Optional[int], typer.Option(help="Pixels per side (default: the model's resolution).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Folder for the pictures (default: RUN/renders).")] = None,
) -> None:
    """Render a 3D run from any cameras: one PNG per view and a labelled sheet."""
    from sdsctl.cameras import Camera
    from sdsctl.engine.images import contact_sheet, save_image
    from sdsctl.engine.scene import render_views, view_name

    if size is not None and size < 1:
        raise SdsctlError(f"--size {size}: give a positive number of pixels")
    if elevation is not None and abs(elevation) > 90:
        raise SdsctlError(f"--elevation {elevation:g}: elevations lie in [-90, 90] degrees")
    if distance is not None and distance <= 1.0:
        raise SdsctlError(f"--distance {distance:g}: the camera must stay outside the bounding sphere (radius 1)")
    azimuths = _floats(azimuth, "--azimuth") if azimuth is not None else None
    param, cameras, _ = open_scene(run_dir)
    base = cameras.evaluation()
    chosen = [Camera(azimuth=a, elevation=base[0].elevation if elevation is None else elevation,
                     distance=base[0].distance if distance is None else distance, fov=base[0].fov)
              for a in (azimuths if azimuths is not None else [c.azimuth for c in base])]
    folder = out or run_dir / "renders"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for camera in chosen:
        path = folder / f"{view_name(camera)}_d{camera.distance:g}.png"
        save_image(render_views(param, [camera], size)[0], path)
        paths.append(path)
    sheet = contact_sheet(paths, labels=True)
    if sheet is not None:
        save_image(sheet, folder / "sheet.png")
    print(f"rendered {len(paths)} view{'s' if len(paths) != 1 else ''} of {run_dir} -> {folder}")


FORMATS = ("ply", "glb", "obj")


def export(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN", help="A finished or interrupted 3D run directory.")],
    format_: Annotated[str, typer.Option("--format", help="ply, glb or obj (vertex colours in each).")] = "glb",
    out: Annotated[Optional[Path], typer.Option(help="The mesh file (default: RUN/mesh.FORMAT).")] = None,
    threshold: Annotated[Optional[float], typer.Option(
        help="Density level of the surface (default: the parameterization's mesh_threshold).")] = None,
) -> None:
    """Write a 3D run's mesh: marching cubes of its density, with vertex colours."""
    from sdsctl.engine.rundir import atomic_write
    from sdsctl.engine.scene import extract_mesh, mesh_bytes, meshes_of

    if format_ not in FORMATS:
        raise SdsctlError(f"--format {format_!r}: choose one of {', '.join(FORMATS)}")
    target = out or run_dir / f"mesh.{format_}"
    param, cameras, _ = open_scene(run_dir)
    if threshold is not None and not hasattr(param, "mesh_grid"):
        raise SdsctlError(f"--threshold is for fields (nerf); {run_dir}'s mesh is given, not found by a threshold")
    if threshold is not None:
        mesh, textured = extract_mesh(param, cameras.evaluation(), threshold), None
    else:
        mesh, textured = meshes_of(param, cameras.evaluation())
    if mesh is None:
        raise SdsctlError(f"{run_dir}: the density never crosses the surface level "
                          f"{param.config.mesh_threshold if threshold is None else threshold:g}; "
                          "try a lower --threshold")
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, mesh_bytes(textured if format_ == "glb" and textured is not None else mesh, format_))
    print(f"wrote {target}: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces")


@sdsctl.hookimpl
def register_commands(app):
    app.command("render")(render)
    app.command("export")(export)
