"""The plan of a comparison or a sweep: which runs, keyed by what, and what to do with each folder.

``sdsctl compare`` and ``sdsctl sweep`` differ only in their *settings* -- the rows of the
report: one per recipe for a comparison, one per point of the grid for a sweep. Everything
after that is one code path (``sdsctl.experiments.compare``): plan → execute → collect → write.

A plan is the settings × the (prompt, seed) pairs, each a :class:`RunSpec`. Every setting is
validated before the first run (a typo in the last one must not cost the others). Its runs
live in ``DIR/runs/<stem>-<key>/`` where ``key`` hashes the setting's fully resolved recipe,
and each run in ``s<seed>-<prompt>-<key>/`` keyed by its own resolved recipe: two settings
never share a folder, and the same plan again finds its finished runs (:func:`folder_state`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np

from sdsctl.errors import SdsctlError


def shapes_pairs(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` (prompt, seed) pairs spread over the shapes world's colour/shape/background
    combinations: the prompts of the first installed metric that has a world
    (``Metric.prompts``; the ``shapes-judge`` plugin's)."""
    from sdsctl import plugins

    prompts = next((p for reg in plugins.components("metrics").values() if (p := reg.obj.prompts())), None)
    if not prompts:
        raise SdsctlError("no installed metric offers default prompts (the shapes-judge plugin does): "
                          "give --prompt TEXT (with --seeds N)")
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [(prompts[int(order[i % len(prompts)])], i) for i in range(n)]


def content_hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def slug(text: str, n: int = 48) -> str:
    """``text`` as a folder name: lower-case words joined by ``-``, whole words up to ``n``
    characters (a first word longer than that is cut)."""
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    if len(words) <= n:
        return words or "prompt"
    cut = words[:n + 1].rsplit("-", 1)[0] if "-" in words[:n + 1] else words[:n]
    return cut.rstrip("-") or "prompt"


def _cut_slug(text: str, n: int = 32) -> str:
    """The folder name runs had before :func:`slug` kept whole words (cut at ``n`` characters):
    a comparison made then finds its runs again."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].rstrip("-") or "prompt"


@dataclasses.dataclass
class Setting:
    """One row of the report before validation: a recipe and the ``--set`` expressions that make it.

    ``label`` None: the recipe file's stem (``compare``); a sweep names each grid point."""

    ref: str
    sets: list[str]
    label: str | None = None
    values: dict[str, Any] = dataclasses.field(default_factory=dict)  # a sweep's grid values, by key


@dataclasses.dataclass
class Entry:
    """One validated row: its label, its content key and its runs' folder."""

    ref: str
    label: str
    key: str
    folder: Path
    loaded: Any  # LoadedRecipe, with the setting's --set and the options applied
    sets: list[str]
    values: dict[str, Any]


@dataclasses.dataclass
class RunSpec:
    """One run of the plan: its row, prompt and seed, its resolved recipe and its folder.

    ``state`` is what the folder holds (:func:`folder_state`): ``new``, ``reuse`` (a finished
    run), ``resume`` (an interrupted one) or ``restart`` (something else, or a failed run)."""

    entry: Entry
    prompt: str
    seed: int
    loaded: Any  # LoadedRecipe of this run (prompt and seed applied)
    recipe_yaml: str  # the fully resolved recipe, as recipe.yaml records it
    path: Path
    state: str

    @property
    def steps(self) -> int:
        return self.loaded.recipe.steps

    @property
    def device(self) -> str:
        return self.loaded.recipe.device

    def describe(self) -> str:
        return f"{self.entry.label} {self.prompt!r} seed {self.seed}"


def entries(settings: list[Setting], overrides: dict[str, Any], out: Path) -> list[Entry]:
    """Load and validate every setting (before any run) and give each a distinct label and folder.

    An unnamed setting's label is its file's stem; stems that occur twice get their folder's
    name in front (``a/x``, ``b/x``), and if that is not enough, their content key."""
    from sdsctl.engine.recipe import find_recipe, load_recipe, to_yaml

    found = []
    for s in settings:
        loaded = load_recipe(s.ref, list(s.sets), dict(overrides))
        found.append((s, find_recipe(s.ref), loaded, content_hash(to_yaml(loaded.recipe))))
    seen: dict[str, str] = {}
    for s, _, _, key in found:
        name = s.label or s.ref
        if key in seen:
            raise SdsctlError(f"{seen[key]} and {name} resolve to the same recipe; give each once")
        seen[key] = name
    stems = [path.stem for _, path, _, _ in found]
    labels = [s.label or (stem if stems.count(stem) == 1 else f"{path.parent.name}/{stem}")
              for stem, (s, path, _, _) in zip(stems, found)]
    labels = [lab if labels.count(lab) == 1 else f"{lab}-{key}" for lab, (_, _, _, key) in zip(labels, found)]
    return [Entry(s.ref, label, key, out / "runs" / f"{path.stem}-{key}", loaded, list(s.sets), dict(s.values))
            for label, (s, path, loaded, key) in zip(labels, found)]


def unknown_words(items: list[Entry], pairs: list[tuple[str, int]]) -> dict[str, list[str]]:
    """Prompt -> words that some setting's model has no whole-word token for."""
    found: dict[str, list[str]] = {}
    for prompt in dict.fromkeys(p for p, _ in pairs):
        words: list[str] = []
        for e in items:
            words += [w for w in e.loaded.model_info.unknown_words(prompt) if w not in words]
        if words:
            found[prompt] = words
    return found


def _recorded_recipe(path: Path) -> str | None:
    try:
        text = (path / "recipe.yaml").read_text()
    except OSError:
        return None
    return text.split("\n", 1)[1] if text.startswith("#") else text


def folder_state(path: Path, run_yaml: str) -> str:
    """What to do with a run folder: ``new``, ``reuse`` (completed), ``resume`` (interrupted with
    a saved state) or ``restart`` (another recipe, a failed run, nothing to continue from)."""
    from sdsctl.engine.rundir import RunDir

    if not path.exists() or not any(path.iterdir()):
        return "new"
    if _recorded_recipe(path) != run_yaml:
        return "restart"
    summary = RunDir(path).read_summary()
    if summary.get("status") == "completed" and (path / "final.png").is_file():
        return "reuse"
    if summary.get("status") == "failed":
        return "restart"  # continuing from the last good state would meet the same failure
    return "resume" if (path / "state.pt").is_file() else "restart"


def plan(items: list[Entry], pairs: list[tuple[str, int]], overrides: dict[str, Any]) -> list[RunSpec]:
    """Every setting on every pair, in report order (row by row), each with its folder's state."""
    from sdsctl.engine.recipe import load_recipe, to_yaml

    specs = []
    for e in items:
        for prompt, seed in pairs:
            loaded = load_recipe(e.ref, list(e.sets), {**overrides, "prompt": prompt, "seed": seed})
            run_yaml = to_yaml(loaded.recipe)
            key = content_hash(run_yaml, 6)
            path = e.folder / f"s{seed}-{slug(prompt)}-{key}"
            earlier = e.folder / f"s{seed}-{_cut_slug(prompt)}-{key}"
            if not path.exists() and earlier.is_dir():  # a run folder named before whole words
                path = earlier
            specs.append(RunSpec(e, prompt, seed, loaded, run_yaml, path, folder_state(path, run_yaml)))
    return specs


def pairs_for(recipe: str, pairs: int | None, prompts: list[str] | None, seeds: int | None,
              sets: list[str] = ()) -> list[tuple[str, int]]:
    """The (prompt, seed) pairs of ``--prompt``, ``--pairs`` and ``--seeds``: ``--prompt`` P..
    (with ``--seeds N``: each with seeds 0..N-1; else prompt i with seed i); ``--seeds N`` alone:
    ``recipe``'s prompt (after ``sets``) with seeds 0..N-1; else ``--pairs`` prompts of the shapes world (8 by
    default), each with seeds 0..N-1 under ``--seeds``."""
    from sdsctl.engine.recipe import load_recipe

    if pairs is not None and pairs <= 0:
        raise SdsctlError(f"--pairs {pairs}: must be positive")
    if seeds is not None and seeds <= 0:
        raise SdsctlError(f"--seeds {seeds}: must be positive")
    if prompts:
        return [(p, s) for p in prompts for s in range(seeds)] if seeds else [(p, i) for i, p in enumerate(prompts)]
    if seeds and pairs is None:
        return [(load_recipe(recipe, list(sets)).recipe.prompt, s) for s in range(seeds)]
    chosen = shapes_pairs(pairs or 8)
    return [(p, s) for p, _ in chosen for s in range(seeds)] if seeds else chosen
