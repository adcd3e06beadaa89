"""Command ``model``: describe a model from its configuration files alone (no weights load).

Family (and the plugin that registered it), pipeline class, prediction type, space, latent
channels and downscale factor, default resolution, text encoders with their token limits, parameter counts and dtype on
disk (from the safetensors headers). ``--json`` prints the same as one JSON object.
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

import sdsctl


def _count(n: int | None) -> str:
    if n is None:
        return "? (no safetensors files here)"
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def model(
    path: Annotated[str, typer.Argument(
        metavar="PATH_OR_ID", help="shapes, a diffusers pipeline folder, a hub id, or a single-file checkpoint.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    variant: Annotated[Optional[str], typer.Option(help="Weight files' variant to count, e.g. fp16.")] = None,
    allow_download: Annotated[bool, typer.Option(
        "--allow-download", help="Download the configuration files of a hub id missing from the local cache.")] = False,
    without: Annotated[Optional[list[str]], typer.Option(
        help="A text encoder to leave out, where the family allows it (SD3: text_encoder_3).")] = None,
    config: Annotated[Optional[str], typer.Option(
        metavar="DIR_OR_ID", help="A single-file checkpoint's architecture: a diffusers folder or hub id.")] = None,
) -> None:
    """Describe a model (family, space, resolution, text encoders, parameters) without loading it."""
    from sdsctl import plugins
    from sdsctl.errors import InvalidConfig, SdsctlError
    from sdsctl.models import Prior

    try:
        info = Prior.describe(path, variant=variant, allow_download=allow_download, without=tuple(without or ()),
                              config=config, families=plugins.families())
    except InvalidConfig as exc:  # its message names the model already
        raise SdsctlError(str(exc)) from exc
    data = info.to_dict()
    family = plugins.components("families").get(data["family"])
    data["family_plugin"] = {"plugin": family.plugin, "distribution": family.distribution} if family else None
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    lines = [
        f"model            {data['source']}",
        f"family           {data['family']} ({data['pipeline']})" + (
            f", plugin {data['family_plugin']['plugin']} ({data['family_plugin']['distribution'] or 'not installed'})"
            if data["family_plugin"] else ""),
        f"prediction       {data['prediction_type']}",
        f"space            {data['space']}" + (f", {data['latent_channels']} latent channels, downscale factor "
                                               f"{data['downscale_factor']}" if data["space"] == "latent" else ""),
        f"resolution       {data['default_resolution']} px (default)",
    ]
    if data["guidance_distilled"]:
        lines.append("guidance         distilled: " + ("the scale is an input of the model (guidance embedding)"
                                                       if data["guidance_embedded"] else "no guidance input")
                     + "; unconditional rows are true CFG")
    for enc in data["text_encoders"]:
        lines.append(f"text encoder     {enc['name']}: {enc['class']}, {enc['max_tokens']} tokens")
    for name, n in data["parameters"].items():
        lines.append(f"parameters       {name}: {_count(n)}" + (f" ({data['dtype_on_disk'][name]} on disk)"
                                                                 if data["dtype_on_disk"][name] else ""))
    typer.echo("\n".join(lines))


@sdsctl.hookimpl
def register_commands(app):
    app.command("model")(model)
