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

import contextlib
import errno
import io
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from sdsctl.errors import SdsctlError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_FILE = ".lock"
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


#: errors of os.link on a filesystem without hard links (FAT, exFAT, some network and FUSE mounts)
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.ENOSYS, errno.EACCES, errno.EMLINK}


def atomic_create(path: Path, data: bytes) -> None:
    """Like :func:`atomic_write`, but raise FileExistsError instead of replacing ``path``.

    A hard link publishes the complete file atomically and fails if ``path`` exists; where
    the filesystem has no hard links, ``O_CREAT | O_EXCL`` creates ``path`` exclusively and
    the data is written into it (a reader may then briefly see it shorter)."""
    path = Path(path)
    try:
        try:
            os.link(_written_temp(path, data), path)  # atomic, and fails if path exists
            return
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in _NO_LINKS:
                raise
    finally:
        _temp_path(path).unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


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
    if path.is_dir():
        RunLock(path).check()  # a live run there: name it, whatever --overwrite says
    if path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir()) and not overwrite:
        if is_run_dir(path):
            raise SdsctlError(f"--out {path} holds a run; continue it with `sdsctl resume {path}`, "
                              "choose another --out, or pass --overwrite to replace its run files")
        raise SdsctlError(f"--out {path} is not empty; choose another --out (or an empty or new folder)")


#: the locks this process holds (its own run may check its folder again)
_HELD: set[Path] = set()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class RunLock:
    """One writer per run directory: ``.lock`` names the process that holds it (pid, host,
    start time), and an OS lock on it (``fcntl.flock``) is what holds it -- the kernel lets go
    when the process ends, however it ends, so a lock left by a killed run is recognised as
    stale and taken over. Without ``fcntl`` (Windows) a lock is stale when its pid is gone."""

    def __init__(self, path: Path):
        self.path = Path(path) / LOCK_FILE
        self.fd: int | None = None
        self.taken_over: dict[str, Any] | None = None  # the stale holder, after acquire()

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    @staticmethod
    def describe(holder: dict[str, Any]) -> str:
        since = holder.get("since")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "an unknown time"
        host = holder.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        return f"pid {holder.get('pid', '?')}{where}, since {when}"

    def _busy(self, holder: dict[str, Any]) -> SdsctlError:
        return SdsctlError(
            f"{self.path.parent} is in use by another sdsctl "
            f"({self.describe(holder)}, `{holder.get('command', 'sdsctl')}`); "
            "one run writes a run directory at a time: wait for it to end, or stop it (Ctrl-C in its "
            f"terminal, or kill {holder.get('pid', 'PID')})")

    def check(self) -> None:
        """Raise if another holder has the lock (nothing is taken)."""
        if not self.path.is_file() or self.path.resolve() in _HELD:
            return
        holder = self._read()
        if self._held_elsewhere(holder):
            raise self._busy(holder)

    def _held_elsewhere(self, holder: dict[str, Any]) -> bool:
        if fcntl is None:
            return bool(holder) and _alive(int(holder.get("pid", 0)))
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing drops the probe's shared lock

    def acquire(self, command: str = "sdsctl") -> RunLock:
        """Take the lock, or raise :class:`SdsctlError` naming the holder (exit 2)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(10):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise self._busy(self._read()) from None
                try:  # the holder before us may have removed the file while we opened it
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
            previous = self._read()
            if (previous and int(previous.get("pid", -1)) != os.getpid() and fcntl is None
                    and _alive(int(previous["pid"]))):
                os.close(fd)
                raise self._busy(previous)
            if previous:
                self.taken_over = previous
            record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(), "command": command}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
            self.fd = fd
            _HELD.add(self.path.resolve())
            return self
        raise SdsctlError(f"could not lock {self.path.parent}: its lock file keeps changing")

    def release(self) -> None:
        if self.fd is None:
            return
        _HELD.discard(self.path.resolve())
        try:
            self.path.unlink(missing_ok=True)  # still holding it: nobody can be mid-acquire on this file
        finally:
            os.close(self.fd)
            self.fd = None

    @contextlib.contextmanager
    def held(self, command: str = "sdsctl", reporter=None):
        """Hold the lock for a ``with`` block; a stale lock taken over is reported by ``reporter.note``."""
        self.acquire(command)
        try:
            if self.taken_over and reporter is not None:
                reporter.note(f"note: took over the lock of {self.path.parent} from {self.describe(self.taken_over)}, "
                              "which is no longer running")
            yield self
        finally:
            self.release()


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
            for old in [*run.preview_paths(), *run._preview_views()]:
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

    def preview_view_path(self, step: int, size: int) -> Path:
        """The enlarged copy of a preview, ``previews/view_<size>/step_NNNNNN.png``."""
        folder = self.previews / f"view_{size}"
        folder.mkdir(exist_ok=True)
        return folder / f"step_{step:06d}.png"

    def _preview_views(self) -> list[Path]:
        return sorted(self.previews.glob("view_*/step_*.png"))

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

    def truncate_metrics(self, up_to_step: int) -> None:
        """Forget the lines of steps after ``up_to_step`` (a stop went back to it)."""
        self.metrics = [line for line in self.metrics if json.loads(line).get("step", 0) <= up_to_step]

    def drop_previews_after(self, step: int) -> None:
        """Forget the previews (and their enlarged copies) of steps after ``step``."""
        for path in [*self.preview_paths(), *self._preview_views()]:
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
