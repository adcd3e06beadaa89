"""Run loggers beside the reporter: ``sdsctl run RECIPE --log tensorboard --log wandb``.

The loop talks to one *reporter* (``sdsctl.engine.panel``: ``start``/``step``/``preview``/``note``/
``close``). :class:`RunLoggers` wraps it and hands the same calls to the chosen loggers
(``sdsctl.components.Logger``, registered through ``register_loggers``), then, after the run,
gives them ``summary.json`` and closes them (:meth:`RunLoggers.finish`). No logger code runs
inside the loop itself, and a logger that raises is switched off with one warning: where the
numbers go never costs the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdsctl import plugins
from sdsctl.components import Logger
from sdsctl.errors import SdsctlError


def build(names: list[str], run_dir: Path, recipe) -> tuple[list[tuple[str, Logger]], list[str]]:
    """The loggers ``names`` select, and a warning for each one that cannot run here.

    An unknown name is an input error (exit 2, before anything runs)."""
    loggers, warnings = [], []
    for name in dict.fromkeys(names):  # each once, in the order given
        reg = plugins.lookup("loggers", name)
        if reg is None:
            installed = ", ".join(sorted(plugins.components("loggers"))) or "none"
            raise SdsctlError(f"--log {name}: no such logger; installed loggers: {installed}")
        why = reg.obj.missing()
        if why:
            warnings.append(f"--log {name}: skipped, {why}")
            continue
        loggers.append((reg.name, reg.obj(reg.obj.Config(name=reg.name), run_dir, recipe)))
    return loggers, warnings


class RunLoggers:
    """A reporter that also feeds loggers (see the module docstring)."""

    def __init__(self, reporter, loggers: list[tuple[str, Logger]]):
        self.reporter = reporter
        self.loggers = list(loggers)

    def _each(self, method: str, *args) -> None:
        for name, logger in list(self.loggers):
            try:
                getattr(logger, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a logger must not stop the run
                self.loggers.remove((name, logger))
                self.reporter.note(f"warning: logger {name!r} failed in {method} and is switched off: "
                                   f"{type(exc).__name__}: {exc}")
                try:
                    logger.close()
                except Exception:  # noqa: BLE001
                    pass

    def __getattr__(self, name: str):
        """Anything else a reporter offers (e.g. the live panel's ``loading`` line) is the reporter's."""
        return getattr(self.reporter, name)

    def start(self, info: dict[str, Any]) -> None:
        self.reporter.start(info)
        self._each("start", info)

    def step(self, record: dict[str, Any]) -> None:
        self.reporter.step(record)
        self._each("step", record)

    def preview(self, step: int, image) -> None:
        self.reporter.preview(step, image)
        self._each("preview", step, image)

    def note(self, text: str) -> None:
        self.reporter.note(text)

    def close(self) -> None:
        self.reporter.close()

    def finish(self, run_dir: Path) -> None:
        """After the run: hand every logger ``summary.json`` (if the run wrote one), then close it."""
        path = run_dir / "summary.json"
        if path.is_file():
            self._each("summary", json.loads(path.read_text()))
        self._each("close")
        self.loggers = []


def flat_numbers(data: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"metrics": {"judge": {"match": True}}}`` -> ``{"metrics/judge/match": 1.0}``: the numbers
    (and booleans) of a nested record, for loggers that take scalars."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_numbers(value, f"{name}/"))
        elif isinstance(value, (bool, int, float)):
            out[name] = float(value)
    return out
