"""The project's exceptions and the exit code each one maps to.

``main()`` catches :class:`SdsctlError` (and its subclasses), prints the message on stderr
without a traceback and exits with the error's ``exit_code``:

* ``2`` -- bad input: a recipe, an option, a missing file (:class:`SdsctlError`,
  :class:`RecipeError`);
* ``1`` -- a failure while running: a non-finite value, a crashing plugin, CUDA out of
  memory (:class:`RunFailed`, :class:`PluginError`).

An interrupted run is not an error: the CLI exits with 130 after writing its state.
"""

from __future__ import annotations

import dataclasses


class SdsctlError(Exception):
    """A problem the user can fix: shown as one message, exit code 2."""

    exit_code = 2


class RunFailed(SdsctlError):
    """The run started but could not go on (non-finite value, out of memory, ...): exit 1."""

    exit_code = 1


class PluginError(SdsctlError):
    """A plugin misbehaved: failed to import, registered a name twice, or raised while running.

    The message names the plugin and, where there is one, the component.
    """

    exit_code = 1


class InvalidConfig(ValueError):
    """Raised by a component's ``check`` (or a model's ``describe``) for a bad option.

    ``field`` is the option's key within the component's section, so the error can point
    at its line in the recipe. (Defined here, with no imports, so that the models layer and
    the components share it without importing each other; ``sdsctl.components`` re-exports it.)
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclasses.dataclass(frozen=True)
class Location:
    """Where a recipe value came from: a file position, or a command-line option."""

    source: str  # a file path, or e.g. "--set seed=3"
    line: int | None = None  # 1-based
    column: int | None = None  # 1-based

    def __str__(self) -> str:
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}:{self.column}"


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where, which key, what, and how to fix it."""

    location: Location | None
    key: str  # dotted key path, "" for the whole recipe
    message: str

    def __str__(self) -> str:
        parts = [str(self.location)] if self.location else []
        if self.key and not self._named_by_option():
            parts.append(self.key)
        parts.append(self.message)
        return ": ".join(parts)

    def _named_by_option(self) -> bool:
        """Whether the location, a command-line option, already names the key: "--device: ..."
        and "--set seed=-1: ..." rather than "--device: device: ..."."""
        loc = self.location
        if loc is None or loc.line is not None or not loc.source.startswith("--"):
            return False
        option, _, value = loc.source[2:].partition(" ")
        if option == "set":
            return value.split("=", 1)[0] == self.key
        return option.replace("-", "_") == self.key.split(".")[0]


def summarize(exc: BaseException, limit: int = 160) -> str:
    """A library's exception as one short line (its type and first line), to follow our own
    message instead of nesting the library's full text in it (``SDSCTL_DEBUG=1`` shows all)."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class RecipeError(SdsctlError):
    """One or more problems with a recipe, each with its location."""

    def __init__(self, problems: list[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))
