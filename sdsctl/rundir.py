"""The run directory: every file a run writes, each written atomically.

Layout (``docs/runs.md``)::

    recipe.yaml          the fully resolved recipe
    metrics.jsonl        one JSON object per step
    previews/step_NNNNNN.png
    final.png            the image as the run ended
    progress.png         contact sheet of the previews
    state.pt             θ, optimizer, RNG and guidance state, step (loads with weights_only=True)
    summary.json         status, steps, timing, device, versions, metrics
    error.log            the traceback, when a plugin crashed

Every write goes to a temporary file in the same folder, is flushed to disk and renamed over
the target (:func:`atomic_write`), so a run directory never holds a truncated file.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Any

import torch

from .errors import SdsctlError

RUN_FILES = ("recipe.yaml", "metrics.jsonl", "final.png", "progress.png", "state.pt", "summary.json", "error.log")
STATE_FORMAT = 1


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _written_temp(path: Path, data: bytes) -> Path:
    """``data`` flushed to disk in a temporary file beside ``path``."""
    tmp = _temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part."""
    path = Path(path)
    try:
        os.replace(_written_temp(path, data), path)
    finally:
        _temp_path(path).unlink(missing_ok=True)


def atomic_create(path: Path, data: bytes) -> None:
    """Like :func:`atomic_write`, but raise FileExistsError instead of replacing ``path``."""
    path = Path(path)
    try:
        os.link(_written_temp(path, data), path)  # atomic, and fails if path exists
    finally:
        _temp_path(path).unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def default_path(output_dir: str, recipe_name: str) -> Path:
    """``<output_dir>/<recipe>-<YYYYmmdd-HHMMSS>``, with a suffix if that exists already."""
    base = Path(output_dir) / f"{recipe_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def is_run_dir(path: Path) -> bool:
    return (path / "recipe.yaml").is_file() or (path / "summary.json").is_file()


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse to write a run into a non-empty folder unless ``overwrite``."""
    if path.exists() and not path.is_dir():
        raise SdsctlError(f"--out {path} is a file, not a folder")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        what = "holds a run" if is_run_dir(path) else "is not empty"
        raise SdsctlError(
            f"{path} {what}; pass --overwrite to replace its run files, choose another --out, "
            f"or continue an interrupted run with `sdsctl resume {path}`"
        )


class RunDir:
    """The files of one run (see the module docstring)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.previews = self.path / "previews"
        self.metrics: list[str] = []  # lines of metrics.jsonl, kept to rewrite the file atomically

    @classmethod
    def create(cls, path: Path, overwrite: bool) -> RunDir:
        """A fresh run directory; with ``overwrite`` only sdsctl's own files are removed."""
        check_target(path, overwrite)
        run = cls(path)
        run.path.mkdir(parents=True, exist_ok=True)
        if not overwrite:  # claim the folder: of two runs started at once, one gets it
            try:
                atomic_create(run.file("summary.json"), json.dumps({"status": "starting"}).encode())
            except FileExistsError:
                raise SdsctlError(f"{path} was just taken by another run; choose another --out") from None
            return run._make_previews()
        for name in RUN_FILES:
            (run.path / name).unlink(missing_ok=True)
        if run.previews.is_dir():
            for old in run.previews.glob("step_*.png"):
                old.unlink()
        return run._make_previews()

    def _make_previews(self) -> RunDir:
        self.previews.mkdir(exist_ok=True)
        return self

    @classmethod
    def open(cls, path: Path) -> RunDir:
        """An existing run directory, to resume."""
        run = cls(path)
        if not run.path.is_dir():
            raise SdsctlError(f"run directory {path} not found")
        if not is_run_dir(run.path):
            raise SdsctlError(f"{path} is not a run directory (it has no recipe.yaml)")
        run.previews.mkdir(exist_ok=True)
        return run

    # -- files
    def file(self, name: str) -> Path:
        return self.path / name

    def preview_path(self, step: int) -> Path:
        return self.previews / f"step_{step:06d}.png"

    def preview_paths(self) -> list[Path]:
        return sorted(self.previews.glob("step_*.png"))

    def write_recipe(self, text: str) -> None:
        atomic_write_text(self.file("recipe.yaml"), text)

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.file("summary.json"), summary)

    def read_summary(self) -> dict[str, Any]:
        try:
            return json.loads(self.file("summary.json").read_text())
        except (OSError, ValueError):
            return {}

    def write_error_log(self, text: str) -> None:
        atomic_write_text(self.file("error.log"), text)

    # -- metrics
    def add_metrics(self, record: dict[str, Any]) -> None:
        self.metrics.append(json.dumps(record))

    def flush_metrics(self) -> None:
        atomic_write_text(self.file("metrics.jsonl"), "".join(line + "\n" for line in self.metrics))

    def load_metrics(self, up_to_step: int) -> None:
        """Keep the lines of steps ``<= up_to_step`` (later ones are recomputed on resume)."""
        self.metrics = []
        path = self.file("metrics.jsonl")
        if path.is_file():
            for line in path.read_text().splitlines():
                if line.strip() and json.loads(line).get("step", 0) <= up_to_step:
                    self.metrics.append(line)

    def drop_previews_after(self, step: int) -> None:
        for path in self.preview_paths():
            if int(path.stem.split("_")[1]) > step:
                path.unlink()

    # -- state
    def save_state(self, state: dict[str, Any]) -> None:
        buf = io.BytesIO()
        torch.save({"format": STATE_FORMAT, **state}, buf)
        atomic_write(self.file("state.pt"), buf.getvalue())

    def load_state(self) -> dict[str, Any] | None:
        """The saved state, or None; loads tensors and plain data only (no code runs)."""
        path = self.file("state.pt")
        if not path.is_file():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise SdsctlError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc
        if state.get("format") != STATE_FORMAT:
            raise SdsctlError(f"{path} has state format {state.get('format')!r}; this sdsctl reads {STATE_FORMAT}")
        return state
