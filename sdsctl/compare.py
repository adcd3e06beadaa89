"""Comparing recipes: each recipe run over the same (prompt, seed) pairs, judged by the metrics.

``sdsctl compare A.yaml B.yaml --pairs 8 --out DIR`` runs every recipe on every pair with the
one run loop (``sdsctl.loop.execute``) and writes:

- ``DIR/compare.json``: per recipe, every run's prompt, seed, seconds, metrics, figures and
  run directory, and a summary (match rate, medians, and mean and spread of every metric);
- ``DIR/compare.md``: one row per recipe (match rate, median shape IoU, median palette error,
  seconds per run), then the mean ± spread of every metric;
- ``DIR/grid.png``: the final images, one labelled row per recipe, one column per pair;
- ``DIR/report.html``: the self-contained report (``sdsctl.report``).

Runs are kept and reused. Each recipe's runs live in ``DIR/runs/<stem>-<key>/`` where ``key``
hashes the recipe's fully resolved content (after ``--set``), and each run in
``s<seed>-<prompt>-<key>/`` keyed by its own resolved recipe: two recipes with the same file
name never share a folder, and calling the same comparison again reuses every completed
run and continues interrupted ones (as ``sdsctl resume`` does). Runs that share a model
share its loaded weights.

Without ``--prompt`` the pairs are prompts of the shapes world (``a {color} {shape} on a
{background} background``), drawn from a fixed seed so every comparison sees the same ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from .images import save_image
from .rundir import atomic_write_json, atomic_write_text


class _Quiet:
    """A reporter that shows nothing: without the live panel a comparison prints one line per run."""

    def loading(self, text): ...
    def start(self, info): ...
    def step(self, record): ...
    def preview(self, step, image): ...
    def note(self, text): ...
    def close(self): ...


class CompareInterrupted(Exception):
    """A run of the comparison was interrupted (Ctrl-C); its state is saved."""


def shapes_pairs(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` (prompt, seed) pairs spread over the shapes world's colour/shape/background combinations."""
    from .shapes.evaluate import all_prompts

    prompts = all_prompts()
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [(prompts[int(order[i % len(prompts)])], i) for i in range(n)]


def _hash(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _slug(text: str, n: int = 32) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].rstrip("-") or "prompt"


@dataclasses.dataclass
class Entry:
    """One recipe of a comparison: its label (a row), its content key and its runs' folder."""

    ref: str
    label: str
    key: str
    folder: Path
    loaded: Any  # LoadedRecipe, with the comparison's --set and options applied


def entries(recipes: list[str], sets: list[str], overrides: dict[str, Any], out: Path) -> list[Entry]:
    """Load and validate every recipe (before any run) and give each a distinct label and folder.

    The label is the file's stem; stems that occur twice get their folder's name in front
    (``a/x``, ``b/x``), and if that is not enough, their content key.
    """
    from .errors import SdsctlError
    from .recipe import find_recipe, load_recipe, to_yaml

    found = []
    for ref in recipes:
        loaded = load_recipe(ref, list(sets), dict(overrides))
        found.append((ref, find_recipe(ref), loaded, _hash(to_yaml(loaded.recipe))))
    seen: dict[str, str] = {}
    for ref, _, _, key in found:
        if key in seen:
            raise SdsctlError(f"recipes {seen[key]} and {ref} resolve to the same content; give each once")
        seen[key] = ref
    stems = [path.stem for _, path, _, _ in found]
    labels = [stem if stems.count(stem) == 1 else f"{path.parent.name}/{stem}" for stem, (_, path, _, _) in zip(stems, found)]
    labels = [lab if labels.count(lab) == 1 else f"{lab}-{key}" for lab, (_, _, _, key) in zip(labels, found)]
    return [Entry(ref, label, key, out / "runs" / f"{path.stem}-{key}", loaded)
            for label, (ref, path, loaded, key) in zip(labels, found)]


def unknown_words(items: list[Entry], pairs: list[tuple[str, int]]) -> dict[str, list[str]]:
    """Prompt -> words that some recipe's model has no whole-word token for."""
    found: dict[str, list[str]] = {}
    for prompt in dict.fromkeys(p for p, _ in pairs):
        words: list[str] = []
        for e in items:
            words += [w for w in e.loaded.model_info.unknown_words(prompt) if w not in words]
        if words:
            found[prompt] = words
    return found


def _numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a metrics dict as ``name.key`` -> float (booleans as 0/1)."""
    out: dict[str, float] = {}
    for k, v in metrics.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_numbers(v, name + "."))
        elif isinstance(v, bool):
            out[name] = float(v)
        elif isinstance(v, (int, float)) and v == v:
            out[name] = float(v)
    return out


def run_numbers(run: dict[str, Any]) -> dict[str, float]:
    """Every number of one run: its metrics (``shapes-judge.shape_iou``, ...) and its figures."""
    numbers = _numbers(run.get("metrics", {}))
    numbers.update(_numbers({k: v for k, v in run.get("figures", {}).items() if v is not None}))
    return numbers


def metric_summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, spread (sample standard deviation; 0 for one run) and count of every number over runs."""
    values: dict[str, list[float]] = {}
    for run in runs:
        for k, v in run_numbers(run).items():
            values.setdefault(k, []).append(v)
    return {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            for k, v in values.items()}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Match rate, median shape IoU, median palette error and seconds per run over one recipe's runs,
    and the mean and spread of every metric (``metrics``).

    The match says *what* an image shows (the judge names the nearest of three shapes, so a
    blob still reads as some shape); the shape IoU says how well formed that shape is (a
    clean render about 0.97, the study's "rough shapes" about 0.6); the palette error how
    clean the colours are. Prompts outside the shapes world have no match (n/a)."""
    judged = [r["metrics"].get("shapes-judge", {}) for r in runs]
    matches = [j["match"] for j in judged if "match" in j]
    ious = [j["shape_iou"] for j in judged if "shape_iou" in j]
    errors = [j["palette_error"] for j in judged if "palette_error" in j]
    return {
        "runs": len(runs),
        "match_rate": sum(matches) / len(matches) if matches else None,
        "matches": sum(matches),
        "median_shape_iou": statistics.median(ious) if ious else None,
        "median_palette_error": statistics.median(errors) if errors else None,
        "seconds_per_run": statistics.mean(r["seconds"] for r in runs),
        "metrics": metric_summary(runs),
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    lines = ["| recipe | judge match | median shape IoU | median palette error | s/run |", "|---|---|---|---|---|"]

    def number(value, fmt: str) -> str:
        return format(value, fmt) if value is not None else "n/a"

    for name, res in results.items():
        s = res["summary"]
        match = f"{s['matches']}/{s['runs']} ({s['match_rate']:.0%})" if s["match_rate"] is not None else "n/a"
        lines.append(f"| {name} | {match} | {number(s.get('median_shape_iou'), '.2f')} | "
                     f"{number(s['median_palette_error'], '.3f')} | {s['seconds_per_run']:.1f} |")
    return "\n".join(lines) + "\n"


def fmt(x: float) -> str:
    return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.2e}"


def metrics_table(results: dict[str, dict[str, Any]]) -> str:
    """Mean ± spread of every metric, one row per metric, one column per recipe."""
    names = list(dict.fromkeys(k for res in results.values() for k in res["summary"].get("metrics", {})))
    if not names:
        return ""
    lines = ["| metric | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for k in names:
        cells = []
        for res in results.values():
            m = res["summary"].get("metrics", {}).get(k)
            cells.append(f"{fmt(m['mean'])} ± {fmt(m['std'])}" if m else "n/a")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


class Models:
    """The loaded priors of a comparison: runs that share a model (config, device, dtype) share
    its weights. One is kept at a time (memory); a run that changed the model (a guidance
    that added adapters to the UNet, e.g. VSD's LoRA) gets it dropped, so the next run loads
    a clean copy."""

    def __init__(self):
        self.key: tuple | None = None
        self.prior = None
        self.loads = 0

    def get(self, loaded):
        from .loop import blame, resolve_device, resolve_dtype

        device = resolve_device(loaded.recipe.device)
        dtype, _ = resolve_dtype(loaded.recipe.dtype, device)
        key = (loaded.recipe.model.model_dump_json(), str(device), str(dtype))
        if key != self.key:
            self.prior, self.key = None, None
            with blame(loaded.components["model"], "loading the model"):
                self.prior = loaded.components["model"].obj(loaded.recipe.model).load(device, dtype)
            self.key = key
            self.loads += 1
        return self.prior

    def after_run(self) -> None:
        unet = getattr(self.prior, "unet", None)
        if getattr(unet, "peft_config", None):
            self.prior, self.key = None, None


class Progress:
    """Runs done, reused and the ETA of a comparison (estimated from the steps of runs executed here)."""

    def __init__(self, total_runs: int, total_steps: int):
        self.total_runs, self.total_steps = total_runs, total_steps
        self.done = self.reused = self.continued = 0
        self.steps_left = total_steps
        self.run_steps = 0
        self.run_seconds = 0.0
        self.started = time.perf_counter()
        self.current = ""

    def finish(self, steps: int, seconds: float | None) -> None:
        """A run finished; ``seconds`` None when it was reused (no time spent here)."""
        self.done += 1
        self.steps_left -= steps
        if seconds is not None:
            self.run_steps += steps
            self.run_seconds += seconds

    def eta(self) -> str:
        import datetime

        if not self.run_steps:
            return "?"
        return str(datetime.timedelta(seconds=int(self.steps_left * self.run_seconds / self.run_steps)))

    def line(self) -> str:
        import datetime

        elapsed = datetime.timedelta(seconds=int(time.perf_counter() - self.started))
        reused = f", {self.reused} reused" if self.reused else ""
        return (f"compare: {self.done}/{self.total_runs} runs done{reused} · elapsed {elapsed} · "
                f"ETA {self.eta()} · now {self.current}")


def _live_reporter(progress: Progress):
    """The run's live panel with the comparison's progress line above it."""
    from .panel import LivePanel

    class CompareLive(LivePanel):
        def render(self):
            from rich.console import Group
            from rich.text import Text

            return Group(Text(progress.line(), style="bold"), super().render())

    return CompareLive()


def _recorded_recipe(path: Path) -> str | None:
    try:
        text = (path / "recipe.yaml").read_text()
    except OSError:
        return None
    return text.split("\n", 1)[1] if text.startswith("#") else text


def _plan(path: Path, run_yaml: str) -> str:
    """What to do with a run folder: ``new``, ``reuse`` (completed), ``resume`` or ``restart``."""
    from .rundir import RunDir

    if not path.exists() or not any(path.iterdir()):
        return "new"
    if _recorded_recipe(path) != run_yaml:
        return "restart"
    summary = RunDir(path).read_summary()
    if summary.get("status") == "completed" and (path / "final.png").is_file():
        return "reuse"
    return "resume" if (path / "state.pt").is_file() else "restart"


def compare(recipes: list[str], pairs: list[tuple[str, int]], out: Path, sets: list[str] = (),
            overrides: dict[str, Any] | None = None, echo=print, live: bool = False,
            clip: Path | None = None) -> dict[str, dict[str, Any]]:
    """Run every recipe on every pair (reusing finished runs); returns ``{label: {"summary": ..., "runs": [...]}}``.

    Raises :class:`CompareInterrupted` when a run was interrupted (its state is saved: the
    same call continues it)."""
    from .loop import execute
    from .recipe import load_recipe, to_yaml
    from .runread import RunData

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    # validate everything before the first run: a typo in the last recipe must not cost the others
    items = entries(recipes, list(sets), overrides, out)
    scorer = None
    if clip is not None:
        from .clipscore import ClipScorer

        scorer = ClipScorer(clip)  # a bad folder fails now, before any run
    for prompt, words in unknown_words(items, pairs).items():
        echo(f"warning: {prompt!r}: no whole-word token for {', '.join(words)} in the model's vocabulary; "
             "the prior has never seen these words (the shapes judge reports n/a for prompts outside its world)")
    plans = []
    for e in items:
        for prompt, seed in pairs:
            run_loaded = load_recipe(e.ref, list(sets), {**overrides, "prompt": prompt, "seed": seed})
            run_yaml = to_yaml(run_loaded.recipe)
            path = e.folder / f"s{seed}-{_slug(prompt)}-{_hash(run_yaml, 6)}"
            plans.append((e, prompt, seed, run_loaded, path, _plan(path, run_yaml)))
    progress = Progress(len(plans), sum(p[3].recipe.steps for p in plans))
    models = Models()
    results: dict[str, dict[str, Any]] = {e.label: {"runs": []} for e in items}
    for n, (e, prompt, seed, run_loaded, path, plan) in enumerate(plans, 1):
        progress.current = f"{e.label} {prompt!r} seed {seed}"
        if plan == "reuse":
            progress.reused += 1
            progress.finish(run_loaded.recipe.steps, None)
        else:
            if not live:
                echo(progress.line())
            reporter = _live_reporter(progress) if live else _Quiet()
            started = time.perf_counter()
            result = execute(run_loaded, path, reporter, overwrite=plan == "restart", resume=plan == "resume",
                             prior=models.get(run_loaded))
            models.after_run()
            if result.status != "completed":
                raise CompareInterrupted(f"interrupted in {path} at step {result.steps_done}/{result.steps}")
            progress.continued += plan == "resume"
            progress.finish(run_loaded.recipe.steps, time.perf_counter() - started)
        data = RunData.read(path)
        metrics = dict(data.summary.get("metrics", {}))
        if scorer is not None:
            metrics["clip"] = {"score": scorer.score(path / "final.png", prompt)}
        judged = metrics.get("shapes-judge", {})
        verdict = {True: "match", False: "miss"}.get(judged.get("match"), "judge n/a")
        how = "reused" if plan == "reuse" else "continued" if plan == "resume" else f"{data.summary['seconds']:.1f}s"
        echo(f"{e.label} [{n}/{len(plans)}] {prompt!r} seed {seed}: {verdict} ({how})")
        results[e.label]["runs"].append({
            "prompt": prompt, "seed": seed, "seconds": data.summary["seconds"], "metrics": metrics,
            "run_dir": str(path), "figures": data.figures(), "reused": plan == "reuse",
        })
    for e in items:
        res = results[e.label]
        res["summary"] = summarize(res["runs"])
        res.update({"recipe": e.ref, "key": e.key, "folder": str(e.folder),
                    "resolved": e.loaded.recipe.model_dump(mode="json")})
        if scorer is None:
            res["summary"]["notes"] = ["CLIP score skipped: no --clip DIR given"]
        results[e.label] = {"summary": res.pop("summary"), "runs": res.pop("runs"), **res}
    echo(f"reused {progress.reused} of {len(plans)} runs, continued {progress.continued} interrupted, "
         f"ran {len(plans) - progress.reused - progress.continued}; model loaded {models.loads} time(s)")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", results)
    atomic_write_text(out / "compare.md", table(results) + "\n" + metrics_table(results))
    columns = [f"{p}\nseed {s}" for p, s in pairs]
    _grid({label: [Path(r["run_dir"]) / "final.png" for r in res["runs"]] for label, res in results.items()},
          columns, out / "grid.png")
    from .report import write_report

    write_report(out, results, pairs, notes=[] if scorer else ["CLIP score skipped: no --clip DIR given."],
                 unknown=unknown_words(items, pairs))
    return results


def _font(size: int):
    from .images import font

    return font(size)


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split():
            trial = f"{line} {word}".strip()
            if line and draw.textlength(trial, font=font) > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def _grid(images: dict[str, list[Path]], columns: list[str], path: Path, size: int = 96, gap: int = 4) -> None:
    """The final images, one row per recipe (labelled on the left), one column per pair (prompt, seed above)."""
    from PIL import Image, ImageDraw

    font = _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = 8 + int(max(probe.textlength(name, font=font) for name in images)) + 8
    heads = [_wrap(probe, c, font, size) for c in columns]
    head_h = 6 + 15 * max(len(h) for h in heads)
    cols = max(len(v) for v in images.values())
    sheet = Image.new("RGB", (label_w + cols * (size + gap), head_h + len(images) * (size + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for c, lines in enumerate(heads):
        for i, line in enumerate(lines):
            draw.text((label_w + c * (size + gap), 3 + 15 * i), line, fill="black", font=font)
    for r, (name, paths) in enumerate(images.items()):
        y = head_h + r * (size + gap)
        draw.text((8, y + size // 2 - 7), name, fill="black", font=font)
        for c, p in enumerate(paths):
            with Image.open(p) as im:
                sheet.paste(im.convert("RGB").resize((size, size), Image.Resampling.NEAREST), (label_w + c * (size + gap), y))
    save_image(sheet, path)
