"""Sweeps: one recipe over the Cartesian product of grids of its values (``sdsctl sweep``).

``--grid guidance.guidance_scale=7.5,20 --grid schedule.warmup_steps=100,300`` makes four
settings, each the recipe with one value of every grid applied as ``--set`` would apply it
(values are YAML, as ``--set``'s are; ``KEY=[a, "b, c"]`` gives a list for values that hold
commas). The settings then go through the comparison's one code path (``sdsctl.experiments.compare``:
the prompts × seeds of each, runs reused and continued, report), ranked by ``--rank-by``.

Every grid is checked before any run: its key and every value are validated against the
recipe, and a problem names the ``--grid`` it came from.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from typing import Any

import yaml

from sdsctl.errors import Location, RecipeError, SdsctlError
from sdsctl.experiments.plan import Setting

_KEY = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")


@dataclasses.dataclass(frozen=True)
class Grid:
    """One ``--grid KEY=V1,V2,...``: the key, its values and how each is written for ``--set``."""

    option: str  # as given, for messages
    key: str
    values: tuple[Any, ...]
    texts: tuple[str, ...]  # each value as --set parses it (and as the setting's label shows it)

    def sets(self) -> list[str]:
        return [f"{self.key}={t}" for t in self.texts]


def _bad(expr: str, why: str) -> SdsctlError:
    return SdsctlError(f"--grid {expr}: {why}")


def parse_grid(expr: str) -> Grid:
    """``KEY=V1,V2,...`` (or ``KEY=[V1, V2, ...]``, a YAML list) -> :class:`Grid`."""
    key, sep, rest = expr.partition("=")
    key = key.strip()
    if not sep or not key:
        raise _bad(expr, "expected KEY=V1,V2,... with a dotted recipe KEY, e.g. --grid guidance.guidance_scale=7.5,20")
    if not _KEY.fullmatch(key):
        raise _bad(expr, f"{key!r} is not a dotted recipe key (letters, digits, _ and dots), "
                         "e.g. schedule.warmup_steps")
    rest = rest.strip()
    if not rest:
        raise _bad(expr, "no values; list one or more after '=', separated by commas")
    if rest.startswith("["):
        try:
            values = yaml.safe_load(rest)
        except yaml.YAMLError as exc:
            raise _bad(expr, f"the list is not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(values, list) or not values:
            raise _bad(expr, "the list is empty; give one or more values")
        texts = [json.dumps(v) for v in values]  # JSON is YAML: --set reads each back as it is
    else:
        texts = [t.strip() for t in rest.split(",")]
        if "" in texts:
            raise _bad(expr, f"value {texts.index('') + 1} is empty (two commas, or a comma at an end)")
        try:
            values = [yaml.safe_load(t) for t in texts]
        except yaml.YAMLError as exc:
            raise _bad(expr, f"a value is not valid YAML ({str(exc).splitlines()[0]})") from None
    for i, v in enumerate(values):
        if any(type(v) is type(w) and v == w for w in values[:i]):  # 1 and true are two values
            raise _bad(expr, f"the value {texts[i]} is listed twice")
    return Grid(expr, key, tuple(values), tuple(texts))


def parse_grids(exprs: list[str], sets: list[str]) -> list[Grid]:
    """Every ``--grid``; a key swept twice, or also fixed by ``--set``, is an input error."""
    if not exprs:
        raise SdsctlError("a sweep needs at least one --grid KEY=V1,V2,... "
                          "(e.g. --grid guidance.guidance_scale=7.5,20)")
    grids = [parse_grid(e) for e in exprs]
    keys = [g.key for g in grids]
    for g in grids:
        if keys.count(g.key) > 1:
            raise SdsctlError(f"--grid {g.key}: given twice; list all its values in one --grid {g.key}=V1,V2,...")
        for other in keys:
            if other != g.key and (other.startswith(g.key + ".") or g.key.startswith(other + ".")):
                raise SdsctlError(f"--grid {g.key} and --grid {other}: one key holds the other; sweep one of them")
        for expr in sets:
            fixed = expr.partition("=")[0].strip()
            if fixed == g.key or fixed.startswith(g.key + ".") or g.key.startswith(fixed + "."):
                raise SdsctlError(f"--grid {g.key} and --set {expr} both set {fixed}; give it once")
    return grids


def labels(grids: list[Grid]) -> list[str]:
    """Short names of the keys: the last part when no other grid ends the same, else the whole key."""
    lasts = [g.key.rsplit(".", 1)[-1] for g in grids]
    return [last if lasts.count(last) == 1 else g.key for last, g in zip(lasts, grids)]


def settings(recipe: str, grids: list[Grid], sets: list[str] = ()) -> list[Setting]:
    """The Cartesian product of the grids: one setting per point, in the grids' order (the last
    grid varies fastest), labelled ``name=value ...``."""
    names = labels(grids)
    out = []
    for point in itertools.product(*[range(len(g.values)) for g in grids]):
        out.append(Setting(
            ref=recipe,
            sets=[*sets, *(f"{g.key}={g.texts[i]}" for g, i in zip(grids, point))],
            label=" ".join(f"{n}={g.texts[i]}" for n, g, i in zip(names, grids, point)),
            values={g.key: g.values[i] for g, i in zip(grids, point)},
        ))
    return out


def validate(recipe: str, grids: list[Grid], sets: list[str], overrides: dict[str, Any]) -> None:
    """Load the recipe with each value of each grid (before any run), so that a bad key or value
    is reported against its ``--grid``, with the recipe's suggestion for a misspelled key."""
    from sdsctl.engine.recipe import load_recipe

    for g in grids:
        for expr in g.sets():
            try:
                load_recipe(recipe, [*sets, expr], overrides)
            except RecipeError as exc:
                where = f"--set {expr}"
                raise RecipeError([dataclasses.replace(p, location=Location(f"--grid {g.option}"))
                                   if p.location is not None and p.location.source == where
                                   else p for p in exc.problems]) from None

