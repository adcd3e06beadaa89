"""Command ``compare``: run several recipes over the same (prompt, seed) pairs and tabulate them."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

import sdsctl
from sdsctl.errors import SdsctlError


def compare(
    recipes: Annotated[list[str], typer.Argument(metavar="RECIPE...", help="Recipe files or bundled recipe names.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: runs/compare-<timestamp>).")] = None,
    pairs: Annotated[int, typer.Option(help="Number of (prompt, seed) pairs from the shapes world.")] = 8,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", help="Use these prompts (seeds 0..N-1) instead of shapes-world pairs.")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE", help="Override a recipe value in every recipe.")] = None,
    model: Annotated[Optional[str], typer.Option(help="Model for every recipe (shortcut for --set model=...).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Steps for every recipe.")] = None,
) -> None:
    """Run each recipe on the same (prompt, seed) pairs; write compare.md, compare.json and grid.png."""
    from sdsctl.compare import compare as run_compare
    from sdsctl.compare import shapes_pairs, table

    if pairs <= 0:
        raise SdsctlError(f"--pairs {pairs}: must be positive")
    chosen = [(p, i) for i, p in enumerate(prompt)] if prompt else shapes_pairs(pairs)
    folder = out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    if (folder / "compare.json").exists():
        raise SdsctlError(f"--out {folder} already holds a comparison; choose another folder")
    overrides = {"model": model, "device": device, "steps": steps}
    results = run_compare(recipes, chosen, folder, set_ or [], overrides, echo=typer.echo)
    typer.echo(table(results), nl=False)
    typer.echo(f"-> {folder / 'compare.md'}")


@sdsctl.hookimpl
def register_commands(app):
    app.command("compare")(compare)
