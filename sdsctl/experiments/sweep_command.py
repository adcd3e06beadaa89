"""Command ``sweep``: one recipe over the Cartesian product of grids of its values × prompts × seeds,
its settings ranked (``sdsctl.experiments.sweep``, ``sdsctl.experiments.ranking``; the outputs are compare's)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

import sdsctl
from sdsctl.errors import SdsctlError
from sdsctl.experiments.executors import (
    AddressOption,
    ClipOption,
    CpusPerRunOption,
    DeviceOption,
    ExecutorOption,
    JobsOption,
    ModelOption,
    NoLiveOption,
    StepsOption,
)


def sweep(
    recipe: Annotated[str, typer.Argument(metavar="RECIPE", help="A recipe file or a bundled recipe name.")],
    grid: Annotated[Optional[list[str]], typer.Option(
        "--grid", "-g", metavar="KEY=V1,V2,...",
        help="Values of one recipe key to sweep (parsed as --set parses them; KEY=[a, \"b, c\"] for values "
             "with commas). Repeatable: the settings are the Cartesian product of every --grid.")] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o",
        help="Output folder (default: runs/sweep-<timestamp>); "
             "the same folder again reuses its finished runs.")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", metavar="TEXT", help="Use this prompt (with each seed). Repeatable.")] = None,
    pairs: Annotated[Optional[int], typer.Option(
        help="Number of prompts from the shapes world (default 8 without --prompt or --seeds).")] = None,
    seeds: Annotated[Optional[int], typer.Option(
        help="Seeds 0..N-1 for every prompt (alone: the recipe's prompt).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", metavar="KEY=VALUE", help="Override a recipe value in every setting. Repeatable.")] = None,
    rank_by: Annotated[Optional[str], typer.Option(
        "--rank-by", metavar="METRIC[:min|:max]",
        help="Rank the settings by this number of the runs (e.g. shapes-judge.shape_iou, image-stats.clipped:min); "
             "default: the judge's match rate then palette error, or clip.score with --clip.")] = None,
    model: ModelOption = None,
    device: DeviceOption = None,
    steps: StepsOption = None,
    clip: ClipOption = None,
    executor: ExecutorOption = "local",
    jobs: JobsOption = None,
    address: AddressOption = None,
    cpus_per_run: CpusPerRunOption = None,
    no_live: NoLiveOption = False,
) -> None:
    """Run a recipe over a grid of its values × prompts × seeds and rank the settings.

    Writes report.html, compare.md, compare.json and grid.png, as compare does."""
    from sdsctl.experiments.compare import check_folder, command
    from sdsctl.experiments.executors import from_options
    from sdsctl.experiments.plan import pairs_for
    from sdsctl.experiments.ranking import parse_rank_by
    from sdsctl.experiments.sweep import parse_grids, settings, validate

    sets = list(set_ or [])
    grids = parse_grids(list(grid or []), sets)
    parse_rank_by(rank_by)  # its syntax, before any run
    folder = out or Path("runs") / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    check_folder(folder)
    runner = from_options(executor, jobs, address, cpus_per_run)
    overrides = {k: v for k, v in {"model": model, "device": device, "steps": steps}.items() if v is not None}
    for g in grids:
        top = g.key.split(".")[0]
        if top in overrides:
            raise SdsctlError(f"--grid {g.key} and --{top} both set {top}; give it once")
    validate(recipe, grids, sets, overrides)
    chosen = pairs_for(recipe, pairs, prompt, seeds, sets)
    live = not no_live and sys.stdout.isatty()
    code = command(settings(recipe, grids, sets), chosen, folder, overrides, echo=typer.echo,
                   err=lambda m: typer.echo(m, err=True), live=live, clip=clip, executor=runner,
                   kind="sweep", rank_by=rank_by)
    if code:
        raise typer.Exit(code)


@sdsctl.hookimpl
def register_commands(app):
    app.command("sweep")(sweep)
