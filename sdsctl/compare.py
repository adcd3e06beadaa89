"""Comparing recipes: each recipe run over the same (prompt, seed) pairs, judged by the metrics.

``sdsctl compare A.yaml B.yaml --pairs 8 --out DIR`` runs every recipe on every pair with the
one run loop (``sdsctl.loop.execute``), each into ``DIR/runs/<recipe>/<NN>/``, then writes:

- ``DIR/compare.json``: every run's prompt, seed, seconds and metrics;
- ``DIR/compare.md``: one row per recipe (match rate, median shape IoU, median palette error,
  seconds per run);
- ``DIR/grid.png``: the final images, one row per recipe, one column per pair.

Without ``--prompt`` the pairs are prompts of the shapes world (``a {color} {shape} on a
{background} background``), drawn from a fixed seed so every comparison sees the same ones.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from .images import save_image
from .rundir import atomic_write_json, atomic_write_text


class _Quiet:
    """A reporter that shows nothing: a comparison prints one line per run instead."""

    def start(self, info): ...
    def step(self, record): ...
    def preview(self, step, image): ...
    def note(self, text): ...
    def close(self): ...


def shapes_pairs(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """``n`` (prompt, seed) pairs spread over the shapes world's colour/shape/background combinations."""
    from .shapes.evaluate import all_prompts

    prompts = all_prompts()
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [(prompts[int(order[i % len(prompts)])], i) for i in range(n)]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Match rate, median shape IoU, median palette error and seconds per run over one recipe's runs.

    The match says *what* an image shows (the judge names the nearest of three shapes, so a
    blob still reads as some shape); the shape IoU says how well formed that shape is (a
    clean render about 0.97, the study's "rough shapes" about 0.6); the palette error how
    clean the colours are."""
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


def compare(recipes: list[str], pairs: list[tuple[str, int]], out: Path, sets: list[str] = (),
            overrides: dict[str, Any] | None = None, echo=print) -> dict[str, dict[str, Any]]:
    """Run every recipe on every pair; returns ``{recipe: {"summary": ..., "runs": [...]}}``."""
    from .loop import execute
    from .recipe import load_recipe

    # validate everything before the first run: a typo in the last recipe must not cost the others
    loaded_all = {ref: load_recipe(ref, list(sets), {**(overrides or {})}) for ref in recipes}
    results: dict[str, dict[str, Any]] = {}
    images: dict[str, list[Path]] = {}
    for ref, loaded in loaded_all.items():
        name = loaded.name
        runs = []
        for i, (prompt, seed) in enumerate(pairs):
            run_loaded = load_recipe(ref, list(sets), {**(overrides or {}), "prompt": prompt, "seed": seed})
            path = out / "runs" / name / f"{i:02d}"
            execute(run_loaded, path, _Quiet(), overwrite=path.exists())
            summary = json.loads((path / "summary.json").read_text())
            judged = summary.get("metrics", {}).get("shapes-judge", {})
            verdict = {True: "match", False: "miss"}.get(judged.get("match"), "")
            echo(f"{name} [{i + 1}/{len(pairs)}] {prompt!r} seed {seed}: {verdict} {summary['seconds']:.1f}s")
            runs.append({"prompt": prompt, "seed": seed, "seconds": summary["seconds"],
                         "metrics": summary.get("metrics", {}), "run_dir": str(path)})
            images.setdefault(name, []).append(path / "final.png")
        results[name] = {"summary": summarize(runs), "runs": runs}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", results)
    atomic_write_text(out / "compare.md", table(results))
    _grid(images, out / "grid.png")
    return results


def _grid(images: dict[str, list[Path]], path: Path) -> None:
    from PIL import Image, ImageDraw

    rows = list(images.items())
    cols = max(len(v) for _, v in rows)
    size, label = 64, 150
    sheet = Image.new("RGB", (label + cols * (size + 2), len(rows) * (size + 2)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, paths) in enumerate(rows):
        draw.text((4, r * (size + 2) + size // 2 - 6), name, fill="black")
        for c, p in enumerate(paths):
            sheet.paste(Image.open(p).convert("RGB").resize((size, size)), (label + c * (size + 2), r * (size + 2)))
    save_image(sheet, path)
