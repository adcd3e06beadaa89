"""Command ``compare``: run several recipes over the same (prompt, seed) pairs and report on them."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

import sdsctl
from sdsctl.devices import ACCEPTED
from sdsctl.errors import SdsctlError


def pairs_for(recipes: list[str], pairs: int | None, prompts: list[str] | None, seeds: int | None) -> list[tuple[str, int]]:
    """The (prompt, seed) pairs: ``--prompt`` P.. (with ``--seeds N``: each with seeds 0..N-1; else
    prompt i with seed i); ``--seeds N`` alone: the first recipe's prompt with seeds 0..N-1; else
    ``--pairs`` prompts of the shapes world (8 by default), each with seeds 0..N-1 under ``--seeds``."""
    from sdsctl.compare import shapes_pairs
    from sdsctl.recipe import load_recipe

    if pairs is not None and pairs <= 0:
        raise SdsctlError(f"--pairs {pairs}: must be positive")
    if seeds is not None and seeds <= 0:
        raise SdsctlError(f"--seeds {seeds}: must be positive")
    if prompts:
        return [(p, s) for p in prompts for s in range(seeds)] if seeds else [(p, i) for i, p in enumerate(prompts)]
    if seeds and pairs is None:
        return [(load_recipe(recipes[0]).recipe.prompt, s) for s in range(seeds)]
    chosen = shapes_pairs(pairs or 8)
    return [(p, s) for p, _ in chosen for s in range(seeds)] if seeds else chosen


def compare(
    recipes: Annotated[list[str], typer.Argument(metavar="RECIPE...", help="Recipe files or bundled recipe names.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder (default: runs/compare-<timestamp>); "
                                                "the same folder again reuses its finished runs.")] = None,
    pairs: Annotated[Optional[int], typer.Option(help="Number of prompts from the shapes world (default 8).")] = None,
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", metavar="TEXT", help="Use this prompt instead of shapes-world ones. Repeatable.")] = None,
    seeds: Annotated[Optional[int], typer.Option(help="Seeds 0..N-1 for every prompt (alone: the first recipe's prompt).")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", "-s", metavar="KEY=VALUE",
                                                      help="Override a recipe value in every recipe. Repeatable.")] = None,
    model: Annotated[Optional[str], typer.Option(metavar="MODEL", help="Model for every recipe (shortcut for --set model=...).")] = None,
    device: Annotated[Optional[str], typer.Option(metavar="DEVICE", help=f"{ACCEPTED}, for every recipe (shortcut for --set device=...).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Steps for every recipe (shortcut for --set steps=...).")] = None,
    clip: Annotated[Optional[Path], typer.Option(metavar="DIR", help="A local CLIP folder (transformers CLIPModel): adds a CLIP score.")] = None,
    no_live: Annotated[bool, typer.Option("--no-live", help="One line per run instead of the live panel.")] = False,
) -> None:
    """Run each recipe on the same (prompt, seed) pairs; write report.html, compare.md, compare.json and grid.png."""
    from sdsctl.compare import CompareInterrupted, metrics_table, table
    from sdsctl.compare import compare as run_compare

    chosen = pairs_for(recipes, pairs, prompt, seeds)
    folder = out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    if folder.is_file() or (folder.is_dir() and any(folder.iterdir())
                            and not ((folder / "compare.json").exists() or (folder / "runs").is_dir())):
        raise SdsctlError(f"--out {folder} is not empty and holds no comparison; choose another folder")
    overrides = {"model": model, "device": device, "steps": steps}
    live = not no_live and sys.stdout.isatty()
    try:
        results = run_compare(recipes, chosen, folder, set_ or [], overrides, echo=typer.echo, live=live, clip=clip)
    except (CompareInterrupted, KeyboardInterrupt) as exc:
        typer.echo(f"{exc or 'interrupted'}; run the same command again to continue (finished runs are reused)", err=True)
        raise typer.Exit(130) from None
    typer.echo(table(results) + "\n" + metrics_table(results), nl=False)
    typer.echo(f"-> {folder / 'report.html'}")


@sdsctl.hookimpl
def register_commands(app):
    app.command("compare")(compare)
