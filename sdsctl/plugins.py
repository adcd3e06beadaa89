"""The plugin manager and the component registry.

Plugins are found once, lazily (:func:`load_plugins`), through the ``sdsctl`` entry-point
group -- the first-party plugins in ``plugins/`` (import name ``sdsctl_plugins``) exactly
like a third-party package's. Environment variables:

* ``SDSCTL_LOAD_PLUGINS=a,b`` loads only the entry points named ``a`` and ``b``
  (empty: none);
* ``SDSCTL_TRACE_PLUGINS=1`` prints every hook call and its result on stderr.

The registry (:func:`components`) asks each plugin's hook separately, so it knows which
plugin (and distribution) registered which name. It is computed on demand, not cached:
registering a plugin (as tests do) takes effect at once.

A name registered by two plugins is a *clash*: it is reported once on stderr (which
distributions, and how to choose), neither component takes the bare name, and each stays
usable under its qualified name ``<distribution>:<name>`` (``<plugin>:<name>`` when both come
from one distribution). Every other component keeps working. A qualified name also works
when there is no clash (``sdsctl:sds``), so a recipe can pin its component's origin.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pluggy

from sdsctl import hookspecs
from sdsctl.errors import PluginError, SdsctlError

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
    return "family" if kind == "families" else kind[:-1]


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


def call_plugin(plugin: str, hook_name: str, call: Callable[..., Any], **kwargs: Any) -> None:
    """Call one plugin's implementation of ``hook_name`` (a caller from :func:`each_plugin`); an
    exception it raises becomes a :class:`PluginError` naming the plugin, an ``SdsctlError``
    (the user's input) passes as it is."""
    try:
        call(**kwargs)
    except SdsctlError:
        raise
    except Exception as exc:
        raise PluginError(f"plugin {plugin!r} failed in {hook_name}: {type(exc).__name__}: {exc}") from exc


def registrations(kind: str) -> list[Registered]:
    """Every component of ``kind`` as registered, clashing names included, in hook order."""
    from sdsctl.components import KINDS, base_class
    from sdsctl.schema import ComponentConfig

    hook_name, base = KINDS[kind][0], base_class(kind)
    found: list[Registered] = []
    for plugin, dist, call in each_plugin(hook_name):

        def register(name: str, cls: type, _plugin: str = plugin, _dist: str | None = dist) -> None:
            what = f"plugin {_plugin!r} registered {singular(kind)} {name!r}"
            if not isinstance(name, str) or not name or ":" in name:
                raise PluginError(f"plugin {_plugin!r} registered a {singular(kind)} with the name {name!r}; "
                                  "names are non-empty strings without ':'")
            if not (isinstance(cls, type) and issubclass(cls, base)):
                public = "sdsctl.models" if base.__module__ == "sdsctl.models.base" else base.__module__
                raise PluginError(f"{what} as {cls!r}, which is not a subclass of {public}.{base.__name__}")
            if hasattr(base, "Config") and not (isinstance(cls.Config, type)
                                                and issubclass(cls.Config, ComponentConfig)):
                raise PluginError(f"{what}, whose Config is not a subclass of sdsctl.components.ComponentConfig")
            found.append(Registered(kind, name, cls, _plugin, _dist))

        call_plugin(plugin, hook_name, call, register=register)
    return found


def qualifiers(regs: list[Registered]) -> list[str]:
    """What tells clashing registrations apart: their distributions, or their plugins when
    the distributions do not (both from one distribution, or not installed)."""
    dists = [r.distribution for r in regs]
    if None not in dists and len(set(dists)) == len(dists):
        return [str(d) for d in dists]
    return [r.plugin for r in regs]


_reported: set[str] = set()


def warn_once(message: str) -> None:
    """Print ``warning: message`` on stderr, once per process (a clash is seen by every lookup)."""
    if message not in _reported:
        _reported.add(message)
        print(f"warning: {message}", file=sys.stderr)


def clash_message(kind: str, name: str, regs: list[Registered]) -> str:
    quals = qualifiers(regs)
    who = " and ".join(
        f"{r.plugin!r} (distribution {r.distribution or 'not installed'})" for r in regs)
    choose = " or ".join(f"`name: {q}:{name}`" for q in quals)
    uninstall = " or ".join(f"`pip uninstall {r.distribution}`"
                            for r in regs if r.distribution and r.distribution != "sdsctl")
    return (f"{singular(kind)} {name!r} is registered by {len(regs)} plugins: {who}. Neither takes the name "
            f"{name!r}; choose one in a recipe with {choose}" + (f", or remove one ({uninstall})" if uninstall else "")
            + ", or load one with SDSCTL_LOAD_PLUGINS")


def components(kind: str) -> dict[str, Registered]:
    """Every registered component of ``kind`` (``"guidances"``, ...), by the name a recipe uses.

    A clashing name is reported once (:func:`warn_once`) and its components appear under their
    qualified names ``<distribution or plugin>:<name>`` (``Registered.name`` is that key).
    """
    by_name: dict[str, list[Registered]] = {}
    for reg in registrations(kind):
        by_name.setdefault(reg.name, []).append(reg)
    found: dict[str, Registered] = {}
    for name, regs in by_name.items():
        if len(regs) == 1:
            found[name] = regs[0]
            continue
        warn_once(clash_message(kind, name, regs))
        for qualifier, reg in zip(qualifiers(regs), regs):
            found[f"{qualifier}:{name}"] = dataclasses.replace(reg, name=f"{qualifier}:{name}")
    return found


def clashing(kind: str, name: str) -> list[str]:
    """The qualified names to choose from when ``name`` is registered by several plugins, else []."""
    found = components(kind)
    if name in found:
        return []
    return sorted(key for key in found if ":" in key and key.split(":", 1)[1] == name)


def lookup(kind: str, name: str) -> Registered | None:
    """The component a recipe's ``name`` selects: a registered name, or ``<distribution>:<name>`` /
    ``<plugin>:<name>`` for any component (clashing or not)."""
    found = components(kind)
    if name in found:
        return found[name]
    if ":" not in name:
        return None
    qualifier, bare = name.split(":", 1)
    matches = [r for r in registrations(kind) if r.name == bare and qualifier in (r.distribution, r.plugin)]
    return dataclasses.replace(matches[0], name=name) if len(matches) == 1 else None


def families() -> dict[str, type]:
    """Every registered model family by the pipeline class it handles (``model_index.json``'s
    ``_class_name``). Two families claiming one pipeline class: the first keeps it (a warning)."""
    table: dict[str, Registered] = {}
    for reg in components("families").values():
        pipeline = reg.obj.pipeline_class
        if pipeline in table:
            warn_once(f"family {reg.name!r} of plugin {reg.plugin!r} is ignored: {pipeline} is handled by family "
                      f"{table[pipeline].name!r} of plugin {table[pipeline].plugin!r}; uninstall one of them")
            continue
        table[pipeline] = reg
    return {pipeline: reg.obj for pipeline, reg in table.items()}
