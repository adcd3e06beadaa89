"""The plugin manager and the component registry.

Plugins are found once, lazily (:func:`load_plugins`), through the ``sdsctl`` entry-point
group -- the first-party plugins in ``plugins/`` (import name ``sdsctl_plugins``) exactly
like a third-party package's. Environment variables:

* ``SDSCTL_LOAD_PLUGINS=a,b`` loads only the entry points named ``a`` and ``b``
  (empty: none);
* ``SDSCTL_TRACE_PLUGINS=1`` prints every hook call and its result on stderr.

The registry (:func:`components`) asks each plugin's hook separately, so it knows which
plugin registered which name, and refuses a name registered twice. It is computed on
demand, not cached: registering a plugin (as tests do) takes effect at once.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError, SdsctlError

GROUP = "sdsctl"

pm = pluggy.PluginManager("sdsctl")
pm.add_hookspecs(hookspecs)
_loaded = False


@dataclasses.dataclass(frozen=True)
class Registered:
    """One registered component (or command)."""

    kind: str  # plural, e.g. "guidances"
    name: str
    obj: Any  # the class (or, for commands, the callback)
    plugin: str
    distribution: str | None

    @property
    def singular(self) -> str:
        return singular(self.kind)

    def describe(self) -> str:
        """How messages name it: ``guidance 'sds' (plugin 'sds')``."""
        return f"{self.singular} {self.name!r} (plugin {self.plugin!r})"


def singular(kind: str) -> str:
    return kind[:-1]


def load_plugins() -> pluggy.PluginManager:
    """Load the entry-point plugins into the global manager (once) and return it."""
    global _loaded
    if not _loaded:
        load_entrypoints(pm, os.environ.get("SDSCTL_LOAD_PLUGINS"))
        if os.environ.get("SDSCTL_TRACE_PLUGINS", "") not in ("", "0"):
            trace(pm)
        _loaded = True
    return pm


def load_entrypoints(manager: pluggy.PluginManager, allow: str | None) -> None:
    """Register the ``sdsctl`` entry points (all, or those named in the comma list ``allow``)."""
    available = {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}
    names = None if allow is None else [n.strip() for n in allow.split(",") if n.strip()]
    if names is not None:
        missing = [n for n in names if n not in available]
        if missing:
            raise SdsctlError(
                f"SDSCTL_LOAD_PLUGINS names {', '.join(map(repr, missing))}, which no installed "
                f"plugin is called; installed: {', '.join(sorted(available)) or 'none'}"
            )
    try:
        if names is None:
            manager.load_setuptools_entrypoints(GROUP)
        else:
            for name in names:
                manager.load_setuptools_entrypoints(GROUP, name=name)
    except Exception as exc:  # find which entry point broke, and say so
        for name, ep in available.items():
            if (names is None or name in names) and not manager.has_plugin(name):
                raise PluginError(
                    f"plugin {name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}"
                ) from exc
        raise
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin {exc.plugin!r}: {exc}") from exc


def trace(manager: pluggy.PluginManager) -> None:
    """Print every hook call (and what it returned) on stderr."""

    def before(hook_name, impls, kwargs):
        names = ", ".join(impl.plugin_name for impl in impls)
        print(f"[sdsctl trace] {hook_name}({', '.join(kwargs)}) -> plugins: {names}", file=sys.stderr)

    def after(outcome, hook_name, impls, kwargs):
        exc = outcome.exception
        status = f"raised {type(exc).__name__}: {exc}" if exc else "ok"
        print(f"[sdsctl trace] {hook_name} {status}", file=sys.stderr)

    manager.add_hookcall_monitoring(before, after)


def distributions(manager: pluggy.PluginManager) -> dict[int, str]:
    """id(plugin) -> name of the distribution that installed it."""
    return {id(plugin): dist.project_name for plugin, dist in manager.list_plugin_distinfo()}


def each_plugin(hook_name: str) -> Iterator[tuple[str, str | None, Callable[..., Any]]]:
    """Yield ``(plugin name, distribution, caller)`` for every plugin implementing ``hook_name``.

    ``caller`` calls that one plugin's implementation through pluggy (argument pruning,
    tracing and monitoring included).
    """
    manager = load_plugins()
    dists = distributions(manager)
    plugins = manager.get_plugins()
    for impl in getattr(manager.hook, hook_name).get_hookimpls():
        others = [p for p in plugins if p is not impl.plugin]
        yield impl.plugin_name, dists.get(id(impl.plugin)), manager.subset_hook_caller(hook_name, others)


def components(kind: str) -> dict[str, Registered]:
    """Every registered component of ``kind`` (``"guidances"``, ...), by name."""
    from .components import KINDS, ComponentConfig

    hook_name, base = KINDS[kind]
    found: dict[str, Registered] = {}
    for plugin, dist, call in each_plugin(hook_name):

        def register(name: str, cls: type, _plugin: str = plugin, _dist: str | None = dist) -> None:
            what = f"plugin {_plugin!r} registered {singular(kind)} {name!r}"
            if not isinstance(name, str) or not name:
                raise PluginError(f"plugin {_plugin!r} registered a {singular(kind)} with the name {name!r}; names are non-empty strings")
            if not (isinstance(cls, type) and issubclass(cls, base)):
                raise PluginError(f"{what} as {cls!r}, which is not a subclass of sdsctl.components.{base.__name__}")
            if not (isinstance(cls.Config, type) and issubclass(cls.Config, ComponentConfig)):
                raise PluginError(f"{what}, whose Config is not a subclass of sdsctl.components.ComponentConfig")
            if name in found:
                raise PluginError(
                    f"{singular(kind)} {name!r} is registered by two plugins: {found[name].plugin!r} and "
                    f"{_plugin!r}; uninstall one, or load only one with SDSCTL_LOAD_PLUGINS"
                )
            found[name] = Registered(kind, name, cls, _plugin, _dist)

        try:
            call(register=register)
        except SdsctlError:
            raise
        except Exception as exc:
            raise PluginError(f"plugin {plugin!r} failed in {hook_name}: {type(exc).__name__}: {exc}") from exc
    return found


def lookup(kind: str, name: str) -> Registered | None:
    return components(kind).get(name)
