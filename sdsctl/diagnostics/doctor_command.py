"""Command ``doctor``: the study's checklist on a run directory (``sdsctl.diagnostics.doctor``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

import sdsctl


def doctor(
    run_dir: Annotated[Path, typer.Argument(
        metavar="RUN_DIR", help="A finished, interrupted or failed run directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the findings as JSON.")] = False,
) -> None:
    """Check a run against the study's checklist: warm-up, saturation, smoothness, convergence, score norm."""
    from sdsctl.diagnostics.doctor import diagnose, text

    report = diagnose(run_dir)
    typer.echo(json.dumps(report, indent=2) if as_json else text(report), nl=as_json)


@sdsctl.hookimpl
def register_commands(app):
    app.command("doctor")(doctor)
