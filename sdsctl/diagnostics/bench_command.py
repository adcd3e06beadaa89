"""Command ``bench``: a recipe's step speed, its breakdown and its distance to the floor (logic in ``bench``)."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

import sdsctl
from sdsctl.errors import SdsctlError


def bench(
    recipe: Annotated[str, typer.Argument(metavar="RECIPE", help="A recipe file or a bundled recipe's name.")],
    steps: Annotated[int, typer.Option("--steps", "-n", help="Timed steps.")] = 50,
    warmup: Annotated[int, typer.Option(help="Untimed steps first (allocations, caches, compilation).")] = 5,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                      help="Override a recipe value (repeatable).")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model folder or hub id (shortcut for --set model=...).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Time a recipe's step without writing a run: steps/s, per-phase breakdown, floor_ratio.

    floor_ratio is the step's time over the bare time of the model evaluations it needs."""
    from sdsctl.diagnostics.bench import PHASES
    from sdsctl.diagnostics.bench import bench as run_bench
    from sdsctl.engine.recipe import load_recipe

    if steps < 2 or warmup < 0:
        raise SdsctlError(f"--steps {steps} --warmup {warmup}: need at least 2 timed steps and no negative warm-up")
    loaded = load_recipe(recipe, set_ or [], {"model": model, "device": device})
    report = run_bench(loaded, steps=steps, warmup=warmup)
    if as_json:
        typer.echo(json.dumps(report))
        return
    n = report["threads"]
    threads = f", {n} thread{'s' if n != 1 else ''}" if report["device"] == "cpu" else ""
    typer.echo(f"{report['recipe']} on {report['device']} ({report['dtype']}{threads}): "
               f"{report['ms_per_step']:.2f} ms/step, "
               f"{report['steps_per_second']:.1f} steps/s, {report['unet_calls_per_step']} UNet call(s)/step")
    typer.echo(f"floor {report['floor_ms']:.2f} ms (the step's model evaluations alone): "
               f"floor_ratio {report['floor_ratio']:.3f}; peak memory {report['peak_memory_mb']:.0f} MiB")
    typer.echo("breakdown (ms/step, separate pass): " +
               ", ".join(f"{k} {report['breakdown_ms'][k]:.2f}" for k in PHASES))
    if "renderer_ms" in report:
        r = report["renderer_ms"]
        typer.echo(f"renderer alone (ms/step, no model): forward {r['forward']:.2f}, backward {r['backward']:.2f}")


@sdsctl.hookimpl
def register_commands(app):
    app.command("bench")(bench)
