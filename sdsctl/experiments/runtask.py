"""One run as a self-contained task, for a worker that is not the driver: a ``--jobs``
subprocess, or a Ray task on any node of a cluster (``sdsctl.experiments.executors``).

A :class:`RunTask` carries the run's fully resolved recipe as text, not a path: a worker on
another node need not see the driver's files. It says what to do with the run's folder
(``new``, ``resume``, ``restart``) and, for a worker without the driver's filesystem, carries
the files of a partial run to continue. The worker runs it with the one run loop
(:func:`sdsctl.engine.run.execute`) and answers with an :class:`Outcome`: a failure is an answer
(its error, as the run's summary states it), not an exception, so a driver can retry it and
report it. :func:`run_shipped` runs a task in a scratch folder and returns the run
directory's files as bytes; :func:`install` writes them into the driver's folder.

``python -m sdsctl.experiments.runtask`` runs one task read as JSON from stdin in place (the ``--jobs``
worker) and prints its outcome as JSON on the last line of stdout.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

#: files of a run directory that are not part of the run (a live writer's lock, temporaries)
_NOT_SHIPPED = (".lock",)


@dataclasses.dataclass
class RunTask:
    recipe_yaml: str  # the fully resolved recipe (sdsctl.engine.recipe.to_yaml)
    origin: str  # where it came from, for recipe.yaml's header
    run_dir: str  # the run directory on the driver
    mode: str  # new | resume | restart
    files: dict[str, bytes] | None = None  # a partial run to continue, for a worker elsewhere


@dataclasses.dataclass
class Outcome:
    """How a run ended on its worker."""

    status: str  # completed | failed | interrupted
    error: str | None = None  # what went wrong (failed, interrupted)
    steps_done: int = 0
    seconds: float | None = None  # wall time on the worker, model loading included
    attempts: int = 1
    files: dict[str, bytes] | None = None  # the run directory (run_shipped only)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if k != "files"})


class Quiet:
    """A reporter that shows nothing: a worker's driver prints one line per run."""

    def loading(self, text): ...
    def start(self, info): ...
    def step(self, record): ...
    def preview(self, step, image): ...
    def note(self, text): ...
    def close(self): ...


def task_for(spec, mode: str | None = None, files: dict[str, bytes] | None = None) -> RunTask:
    """The task of a planned run (``sdsctl.experiments.plan.RunSpec``)."""
    return RunTask(spec.recipe_yaml, spec.loaded.origin, str(spec.path), mode or spec.state, files)


def load_task_recipe(task: RunTask):
    """The task's recipe, loaded and checked as ``sdsctl run`` would (plugins from this worker's
    environment). It must resolve to the text it was sent as, or the driver would not find
    the run's folder again."""
    from sdsctl.engine.recipe import load_recipe, to_yaml
    from sdsctl.errors import RunFailed

    with tempfile.TemporaryDirectory(prefix="sdsctl-recipe-") as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(task.recipe_yaml)
        loaded = load_recipe(path)
    if to_yaml(loaded.recipe) != task.recipe_yaml:
        raise RunFailed("the recipe resolves differently on this worker than on the driver (other "
                        "sdsctl or plugin versions?); install the same versions on every node")
    return dataclasses.replace(loaded, origin=task.origin)


def describe_error(exc: BaseException) -> str:
    """An exception as the one line a table can show: sdsctl's own messages as they are, a
    library's as its type and first line."""
    from sdsctl.errors import SdsctlError, summarize

    if isinstance(exc, SdsctlError):
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return summarize(exc)


def run_task(task: RunTask, path: Path | None = None, *, loaded=None, prior=None, reporter=None) -> Outcome:
    """Run ``task`` into ``path`` (default: its run directory on the driver).

    ``loaded`` / ``prior``: the recipe and model already loaded (the in-process executor
    shares one model among runs). Every exception of the run becomes a failed outcome with
    its message; a Ctrl-C (KeyboardInterrupt) is not caught."""
    from sdsctl.engine.run import execute

    started = time.perf_counter()
    path = Path(path or task.run_dir)
    try:
        loaded = loaded or load_task_recipe(task)
        result = execute(loaded, path, reporter or Quiet(), overwrite=task.mode == "restart",
                         resume=task.mode == "resume", prior=prior, command="sdsctl worker")
    except Exception as exc:  # noqa: BLE001 - a failed run is an answer, reported with its error
        return Outcome("failed", error=describe_error(exc), seconds=time.perf_counter() - started,
                       steps_done=_steps_done(path))
    seconds = time.perf_counter() - started
    if result.status != "completed":
        error = f"interrupted at step {result.steps_done}/{result.steps}"
        error += f" ({result.signal})" if result.signal else ""
        return Outcome("interrupted", error=error, steps_done=result.steps_done, seconds=seconds)
    return Outcome("completed", steps_done=result.steps_done, seconds=seconds)


def _steps_done(path: Path) -> int:
    try:
        return int(json.loads((path / "summary.json").read_text()).get("steps_done", 0))
    except (OSError, ValueError, AttributeError):
        return 0


# ----------------------------------------------------------------------------- shipping files

def pack(path: Path) -> dict[str, bytes]:
    """Every file of a run directory as ``relative path -> bytes`` (no lock, no temporaries)."""
    path = Path(path)
    if not path.is_dir():
        return {}
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.name not in _NOT_SHIPPED and not p.name.endswith(".tmp")}


def _target(root: Path, rel: str) -> Path:
    parts = Path(rel).parts
    if not parts or Path(rel).is_absolute() or ".." in parts:
        raise ValueError(f"refusing to write {rel!r} outside the run directory")
    return root.joinpath(*parts)


def unpack(files: dict[str, bytes], path: Path) -> None:
    for rel, data in files.items():
        target = _target(path, rel)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def install(files: dict[str, bytes], path: Path) -> None:
    """Make the driver's run directory ``path`` hold exactly ``files`` (a run that ran elsewhere).

    The directory's lock is held meanwhile (a local ``sdsctl run`` on it is refused), and
    ``summary.json`` is written last: a directory cut off half-way never reads as finished."""
    from sdsctl.engine.rundir import RunLock, atomic_write

    path = Path(path)
    with RunLock(path).held("sdsctl (installing a run that ran on a worker)"):
        for old in sorted(path.rglob("*"), reverse=True):
            if old.is_file() and old.name not in _NOT_SHIPPED and old.relative_to(path).as_posix() not in files:
                old.unlink()
        for rel in sorted(files, key=lambda r: r == "summary.json"):
            target = _target(path, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, files[rel])


def run_shipped(task: RunTask, reporter=None) -> Outcome:
    """Run ``task`` in a scratch folder of this worker (starting from the files it carries) and
    return its outcome with the run directory's files, whatever node this is."""
    with tempfile.TemporaryDirectory(prefix="sdsctl-run-") as tmp:
        path = Path(tmp) / "run"
        if task.files:
            unpack(task.files, path)
        outcome = run_task(task, path, reporter=reporter)
        outcome.files = pack(path)
        if outcome.error:  # messages name the scratch folder: name the driver's instead
            outcome.error = outcome.error.replace(str(path), task.run_dir)
        if "summary.json" in outcome.files:
            outcome.files["summary.json"] = outcome.files["summary.json"].replace(
                json.dumps(str(path))[1:-1].encode(), json.dumps(task.run_dir)[1:-1].encode())
    return outcome


# ----------------------------------------------------------------------------- the --jobs worker

def _main() -> int:
    """Run the task on stdin in place; the outcome is the last line of stdout."""
    data: dict[str, Any] = json.loads(sys.stdin.read())
    task = RunTask(**data)
    try:
        outcome = run_task(task)
    except KeyboardInterrupt:  # a signal while loading (the run's own handler stops it then: StopNow)
        outcome = Outcome("interrupted", error="interrupted while loading", steps_done=_steps_done(Path(task.run_dir)))
    sys.stdout.write("\n" + outcome.to_json() + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(_main())
