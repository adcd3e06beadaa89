"""Commands of the shapes prior: ``train-shapes``, ``sample`` and ``evaluate-prior``.

``train-shapes`` trains the embedded prior (``sdsctl.shapes.train``), resumable from its own
checkpoint; ``sample`` draws one image from any prior with DDIM (diffusers'
``StableDiffusionPipeline``); ``evaluate-prior`` measures a shapes prior's fidelity, its
quality words and its encoder's robustness (``sdsctl.shapes.evaluate``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

import sdsctl
from sdsctl.devices import ACCEPTED
from sdsctl.errors import SdsctlError, summarize


def _model_folder(model: str) -> tuple[str, str]:
    from sdsctl.components import InvalidConfig
    from sdsctl.models import resolve_source

    try:
        return resolve_source(model)
    except InvalidConfig as exc:
        raise SdsctlError(f"--model {model}: {exc}") from exc


def _pipeline(model: str, device: str):
    from sdsctl.models.sources import hub_hint
    from sdsctl.shapes import sampling

    kind, source = _model_folder(model)
    try:
        return sampling.load_pipeline(source, device=device, local_files_only=kind == "folder")
    except (OSError, ValueError) as exc:
        if kind == "hub":
            raise SdsctlError(f"{hub_hint(source)} ({summarize(exc)})") from exc
        raise SdsctlError(f"cannot load the model in {source} ({summarize(exc)}); `sdsctl model {source}` "
                          "says what sdsctl reads there") from exc


def _device(device: str) -> str:
    """``--device`` as a torch device name; one that is not here is exit 2 naming those that are."""
    from sdsctl.devices import resolve

    return str(resolve(device))


DeviceOption = Annotated[str, typer.Option("--device", metavar="DEVICE", help=f"{ACCEPTED}")]


def train_shapes(
    out: Annotated[Path, typer.Option(
        "--out", "-o", metavar="PATH", help="work folder: checkpoint, tokenizer and the exported prior/")],
    seed: Annotated[int, typer.Option(help="seed of the world and of the training")] = 0,
    vae_steps: Annotated[int, typer.Option(help="VAE training steps")] = 2000,
    decoder_steps: Annotated[int, typer.Option(help="decoder fine-tuning steps")] = 600,
    prior_steps: Annotated[int, typer.Option(help="UNet + text encoder training steps")] = 10000,
    device: DeviceOption = "auto",
    smoke: Annotated[bool, typer.Option("--smoke", help="a few steps of every stage (to check the set-up)")] = False,
) -> None:
    """Train the shapes prior as shipped (about 85 min on 2 CPU cores; resumable); writes OUT/prior/.

    The defaults are the shipped prior's recipe (docs/shapes-prior.md): about 85 minutes on a
    2-core CPU, a few minutes on a GPU. Interrupted, the same command resumes from
    OUT/checkpoint.pt. --smoke trains a few steps of every stage in seconds, to check the set-up.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from sdsctl.shapes.train import TrainConfig, Trainer

    if min(vae_steps, prior_steps) <= 0 or decoder_steps < 0:
        raise SdsctlError("--vae-steps and --prior-steps must be positive, --decoder-steps at least 0")
    kw = dict(seed=seed, device=_device(device))
    cfg = TrainConfig.smoke(**kw) if smoke else TrainConfig(vae_steps=vae_steps, decoder_steps=decoder_steps,
                                                            prior_steps=prior_steps, **kw)
    columns = [TextColumn("{task.description:>8}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[logs]}")]
    with Progress(*columns) as progress:
        tasks: dict[str, int] = {}

        def report(stage: str, step: int, total: int, logs: dict) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total, logs="")
            text = "  ".join(f"{k} {v:.4g}" for k, v in logs.items())
            progress.update(tasks[stage], completed=step, logs=text)

        folder = Trainer(out, cfg, report).run()
    typer.echo(f"prior written to {folder}")


def sample(
    prompt: Annotated[str, typer.Option(help="the text prompt ('' for an unconditional sample)")],
    out: Annotated[Path, typer.Option("--out", "-o", metavar="PATH", help="PNG file to write")],
    seed: Annotated[int, typer.Option(help="seed of the initial noise")] = 0,
    steps: Annotated[int, typer.Option(help="DDIM steps")] = 50,
    guidance_scale: Annotated[float, typer.Option(help="classifier-free guidance scale")] = 7.5,
    negative_prompt: Annotated[str, typer.Option(help="prompt of the unconditional branch")] = "",
    model: Annotated[str, typer.Option(metavar="MODEL", help="shapes, a diffusers folder or a hub id")] = "shapes",
    device: DeviceOption = "auto",
    overwrite: Annotated[bool, typer.Option(help="replace OUT if it exists")] = False,
    view_size: Annotated[int, typer.Option(
        "--view-size", metavar="N",
        help="also write OUT_N.png, the pixels enlarged to N for viewing, as run's final_512.png (0: none)")] = 512,
) -> None:
    """Draw one image from a prior with DDIM."""
    import torch

    from sdsctl.engine.images import save_image, save_view
    from sdsctl.shapes import sampling
    from sdsctl.shapes.tokenizer import unknown_words

    if out.suffix.lower() != ".png":
        raise SdsctlError(f"--out {out}: the image is written as PNG; give a file name ending in .png")
    view = out.with_name(f"{out.stem}_{view_size}.png") if view_size > 0 else None
    for path in (out, view):
        if path is not None and path.exists() and not overwrite:
            raise SdsctlError(f"--out {out}: {path} exists; choose another file or pass --overwrite")
    if view_size < 0:
        raise SdsctlError(f"--view-size {view_size}: a size in pixels, or 0 for no enlarged copy")
    if steps <= 0:
        raise SdsctlError(f"--steps {steps}: must be positive")
    pipe = _pipeline(model, _device(device))
    unknown = unknown_words(pipe.tokenizer, prompt)
    if unknown:
        typer.echo(f"warning: the model does not know the word(s): {', '.join(unknown)}", err=True)
    image = sampling.sample(pipe, [prompt], [seed], steps=steps, guidance_scale=guidance_scale,
                            negative_prompt=negative_prompt or None)[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    tensor = torch.from_numpy(image).permute(2, 0, 1)
    save_image(tensor, out)
    typer.echo(str(out))
    if view is not None and max(tensor.shape[-2:]) < view_size:  # an enlarged copy, where it enlarges
        save_view(tensor, view, view_size)
        typer.echo(str(view))


def evaluate_prior(
    model: Annotated[str, typer.Option(metavar="MODEL", help="shapes or a folder holding a shapes prior")] = "shapes",
    out: Annotated[Optional[Path], typer.Option(
        "--out", "-o", metavar="PATH", help="folder for report.json and sample grids")] = None,
    quick: Annotated[bool, typer.Option(help="fewer samples (a smoke check)")] = False,
) -> None:
    """Measure a shapes prior: prompt fidelity, unconditional samples, quality words, encoder robustness, VAE round trip."""  # noqa: E501 -- the help's one line
    from sdsctl.shapes import evaluate

    kind, source = _model_folder(model)
    if kind != "folder":
        raise SdsctlError(f"--model {model}: evaluate-prior needs a local shapes prior folder")
    t0 = time.time()
    report = evaluate.evaluate(source, quick=quick, out=out)
    report["seconds"] = round(time.time() - t0, 1)
    typer.echo(json.dumps(report, indent=2))


def vocabulary() -> None:
    """List the words the shapes prior knows (its prompts use only these)."""
    from sdsctl.shapes import world

    degradations = [w for words in world.DEGRADATION_WORDS.values() for w in words]
    lines = [
        f"colours       {', '.join(world.COLORS)}",
        f"shapes        {', '.join(world.SHAPES)}",
        f"caption       {world.CAPTION_TEMPLATE.format(color='<colour>', shape='<shape>', background='<colour>')}",
        f"degradations  {', '.join(degradations)}",
        f"negative      {', '.join(world.GENERIC_NEGATIVE_WORDS)}",
        f"positive      {', '.join(world.POSITIVE_WORDS)}",
        "",
        'e.g. "a red circle on a blue background", negative_prompt "blurry, low quality". Other words',
        "reach the model as pieces it never saw: sdsctl warns about them (docs/shapes-prior.md).",
    ]
    typer.echo("\n".join(lines))


@sdsctl.hookimpl
def register_commands(app):
    app.command("train-shapes")(train_shapes)
    app.command("sample")(sample)
    app.command("evaluate-prior")(evaluate_prior)
    app.command("vocabulary")(vocabulary)
