"""What a run shows while it optimizes: a rich live panel, or plain log lines.

The loop talks to a *reporter* (:class:`LivePanel` or :class:`PlainLog`) through six calls:
``loading(text)`` while the recipe is read and the model loads (what is loading), ``start(info)``,
``step(record)`` after every step, ``preview(step, image)`` every ``output.preview_every``
steps, ``note(text)`` and ``close()``. The live panel shows a
progress bar with ETA, steps/s, the timestep(s) and phase, loss and score norms, the
learning rate, device and memory, and the current image drawn with half blocks. When stdout
is not a terminal (or with ``--no-live``) :class:`PlainLog` prints one line every
``preview_every`` steps instead. The panel shows a loading line from the first moment and keeps
one width (:attr:`LivePanel.width`) whatever the numbers in it.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from collections import deque
from typing import Any

import torch

from sdsctl.devices import peak_memory_mb
from sdsctl.engine.images import half_blocks


def memory_text(device: torch.device) -> str:
    """Allocated and peak memory on a CUDA device; the process's peak RSS on the CPU."""
    if device.type == "cuda":
        mib = 2**20
        return (f"{torch.cuda.memory_allocated(device) / mib:.0f} MiB "
                f"(peak {torch.cuda.max_memory_allocated(device) / mib:.0f} MiB)")
    return f"peak RSS {peak_memory_mb(device):.0f} MiB"


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


def _num(x: float) -> str:
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 or x == 0 else f"{x:.2e}"


class Speed:
    """Steps per second over the last few steps (for speed and ETA)."""

    def __init__(self, window: int = 20):
        self.times: deque[float] = deque(maxlen=window)

    def tick(self, seconds: float | None = None) -> None:
        """One step done, ``seconds`` into the run (the record's own time: records reach the
        reporter in bursts, on logging steps), or now."""
        self.times.append(time.perf_counter() if seconds is None else seconds)

    @property
    def steps_per_second(self) -> float:
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / max(self.times[-1] - self.times[0], 1e-9)

    def eta(self, remaining: int) -> str:
        sps = self.steps_per_second
        return _duration(remaining / sps) if sps > 0 else "?"


def _timesteps(record: dict[str, Any]) -> str:
    return " ".join(f"{k} {v}" for k, v in record.get("timesteps", {"t": record.get("t")}).items())


def _camera(record: dict[str, Any]) -> str:
    """A 3D step's camera, ``camera az 30° el 12° d 2.2 fov 55°`` (empty for a 2D run)."""
    c = record.get("camera")
    if not c:
        return ""
    return (f"  camera az {c['azimuth']:.0f}° el {c['elevation']:.0f}° d {c['distance']:.1f} "
            f"fov {c['fov']:.0f}°")


def _norms(record: dict[str, Any]) -> str:
    return "  ".join(f"{k} {_num(v)}" for k, v in record.get("norms", {}).items())


class PlainLog:
    """Periodic log lines, for logs and pipes."""

    def __init__(self, every: int = 10, stream=None):
        self.every = max(1, every)
        self.stream = stream
        self.speed = Speed()
        self.total = 0

    def _print(self, text: str) -> None:
        stream = self.stream or sys.stdout
        print(text, file=stream, flush=True)

    def loading(self, text: str) -> None:
        self._print(f"sdsctl: {text} ...")

    def start(self, info: dict[str, Any]) -> None:
        self.every = max(1, info.get("preview_every", self.every))
        self.total = info["steps"]
        self.device = info["device"]
        start = f" from step {info['start_step']}" if info["start_step"] else ""
        n = info.get("threads")
        threads = f", {n} thread{'s' if n != 1 else ''}" if n and info["device"] == "cpu" else ""
        self._print(f"sdsctl: {info['title']} -- {info['steps']} steps{start} on {info['device']}{threads} "
                    f"-> {info['run_dir']}")

    def step(self, record: dict[str, Any]) -> None:
        self.speed.tick(record.get("seconds"))
        step = record["step"]
        if step % self.every and step != self.total:
            return
        self._print(
            f"step {step}/{self.total}  {record['phase']}  {_timesteps(record)}{_camera(record)}  "
            f"loss {_num(record['loss'])}  "
            f"{_norms(record)}  lr {record['lr']:.2g}  {self.speed.steps_per_second:.1f} steps/s  "
            f"eta {self.speed.eta(self.total - step)}"
        )

    def preview(self, step: int, image: torch.Tensor) -> None:
        pass

    def note(self, text: str) -> None:
        self._print(text)

    def close(self) -> None:
        pass


class LivePanel:
    """The rich live panel (see the module docstring)."""

    def __init__(self, console=None, preview_width: int | None = None):
        from rich.console import Console

        self.console = console or Console()
        #: the panel's width, fixed for the run: the figures never make it jump
        self.width = min(self.console.width, 112)
        # 32 columns (16 lines) beside the ~70 columns of figures, less on a narrow terminal
        self.preview_width = preview_width or max(12, min(32, self.width - 78))
        self.speed = Speed()
        self.record: dict[str, Any] = {}
        self.image = None
        self.notes: list[str] = []
        self.live = None
        self.info: dict[str, Any] | None = None
        self.loading_text = "starting"
        self.started = time.perf_counter()

    def _live(self) -> None:
        from rich.live import Live

        if self.live is None:
            self.live = Live(console=self.console, get_renderable=self.render, refresh_per_second=4,
                             transient=False, redirect_stdout=False, redirect_stderr=False)
            self.live.start()

    def loading(self, text: str) -> None:
        self.loading_text = text
        self.loading_since = time.perf_counter()
        self._live()

    def start(self, info: dict[str, Any]) -> None:
        self.info = info
        self.started = time.perf_counter()
        self._live()

    def step(self, record: dict[str, Any]) -> None:
        self.speed.tick(record.get("seconds"))
        self.record = record

    def preview(self, step: int, image: torch.Tensor) -> None:
        self.image = half_blocks(image, self.preview_width)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def close(self) -> None:
        if self.live is not None:
            if self.info is None:  # closed while loading (an error, a stop): leave no panel behind
                self.live.transient = True
            self.live.refresh()
            self.live.stop()
            self.live = None
        for text in self.notes:
            self.console.print(text, highlight=False, markup=False)
        self.notes = []

    def render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        if self.info is None:
            return self._render_loading()
        info, rec = self.info, self.record
        total = info["steps"]
        step = rec.get("step", info["start_step"])
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=total, completed=step, width=40),
                    Text(f"{step}/{total}  {100 * step / total:.0f}%  ETA {self.speed.eta(total - step)}"))
        lines = [
            bar,
            Text(f"{self.speed.steps_per_second:.1f} steps/s   "
                 f"elapsed {_duration(time.perf_counter() - self.started)}"),
        ]
        if rec:
            lines += [
                Text(f"phase {rec['phase']}   {_timesteps(rec)}{_camera(rec)}"),
                Text(f"loss {_num(rec['loss'])}   {_norms(rec)}"),
                Text(f"lr {rec['lr']:.2g}   device {info['device']}"
                     + (f" ({info['threads']} thread{'s' if info['threads'] != 1 else ''})"
                        if info.get("threads") and info["device"] == "cpu" else "")
                     + f"   {memory_text(torch.device(info['device']))}"),
            ]
        lines.append(Text(f"run {info['run_dir']}", style="dim"))
        lines += [Text(n, style="yellow") for n in self.notes[-2:]]
        # Fixed column widths: the preview stays where it is whatever the figures' lengths and
        # the notes (a line too long for its column ends in an ellipsis)
        body = Table.grid(padding=(0, 2))
        body.add_column(width=max(10, self.width - 4 - 2 - self.preview_width), no_wrap=True)
        body.add_column(width=self.preview_width, no_wrap=True)
        body.add_row(Group(*lines), self.image if self.image is not None else Text(""))
        for line in lines:
            if isinstance(line, Text):
                line.no_wrap, line.overflow = True, "ellipsis"
        return Panel(body, title=f"sdsctl · {info['title']}", title_align="left", width=self.width)

    def _render_loading(self):
        from rich.panel import Panel
        from rich.spinner import Spinner
        from rich.text import Text

        seconds = time.perf_counter() - getattr(self, "loading_since", self.started)
        line = Text(f"{self.loading_text} ...  {seconds:.0f} s", no_wrap=True, overflow="ellipsis")
        return Panel(Spinner("dots", text=line), title="sdsctl · loading", title_align="left", width=self.width)


def make_reporter(live: bool, every: int = 10):
    """The live panel when ``live`` and stdout is a terminal (a dumb one excepted), else plain
    log lines (every ``every`` steps; ``start`` takes the recipe's ``preview_every``)."""
    if live and sys.stdout.isatty() and os.environ.get("TERM") != "dumb":
        return LivePanel()
    return PlainLog(every)
