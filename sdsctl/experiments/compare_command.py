"""Command ``compare``: run several recipes over the same (prompt, seed) pairs and report on them."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

import sdsctl
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


def pairs_for(recipes: list[str], pairs: int | None, prompts: list[str] | None,
              seeds: int | None) -> list[tuple[str, int]]:
    """The (prompt, seed) pairs (``plan.pairs_for``; ``--seeds`` alone: the first recipe's prompt)."""
    from sdsctl.experiments.plan import pairs_for as pairs_of

    return pairs_of(recipes[0], pairs, prompts, seeds)


def compare(
    recipes: Annotated[list[str], typer.Argument(metavar="RECIPE...",
                                                 help="Recipe files or bundled recipe names.")],
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o",
        help="Output folder (default: runs/compare-<timestamp>); "
             "the same folder again reuses its finished runs.")] = None,
    pairs: Annotated[Optional[int], typer.Option(help="Number of prompts from the shapes world (default 8).")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option(
        "--prompt", metavar="TEXT", help="Use this prompt instead of shapes-world ones. Repeatable.")] = None,
    seeds: Annotated[Optional[int], typer.Option(
        help="Seeds 0..N-1 for every prompt (alone: the first recipe's prompt).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", "-s", metavar="KEY=VALUE", help="Override a recipe value in every recipe. Repeatable.")] = None,
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
    """Run each recipe on the same (prompt, seed) pairs; write report.html, compare.md, compare.json and grid.png."""
    from sdsctl.experiments.compare import check_folder, command
    from sdsctl.experiments.executors import from_options
    from sdsctl.experiments.plan import Setting

    folder = out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    check_folder(folder)
    runner = from_options(executor, jobs, address, cpus_per_run)
    chosen = pairs_for(recipes, pairs, prompt, seeds)
    overrides = {"model": model, "device": device, "steps": steps}
    live = not no_live and sys.stdout.isatty()
    settings = [Setting(ref, list(set_ or [])) for ref in recipes]
    code = command(settings, chosen, folder, overrides, echo=typer.echo, err=lambda m: typer.echo(m, err=True),
                   live=live, clip=clip, executor=runner)
    if code:
        raise typer.Exit(code)


@sdsctl.hookimpl
def register_commands(app):
    app.command("compare")(compare)
