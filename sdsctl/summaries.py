"""A comparison's numbers: every number of a run, and per setting its match rate, medians,
and the mean and spread of every metric -- read by ``compare.md``, ``report.html`` and the
sweep's ranking alike (``sdsctl.compare`` writes them, ``sdsctl.report`` and
``sdsctl.ranking`` read them; none of them imports another for these).
"""

from __future__ import annotations

import statistics
from typing import Any


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


def completed(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that finished (a failed run has no figures to average)."""
    return [r for r in runs if r.get("status", "completed") == "completed"]


def metric_summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, spread (sample standard deviation; 0 for one run) and count of every number over runs."""
    values: dict[str, list[float]] = {}
    for run in completed(runs):
        for k, v in run_numbers(run).items():
            values.setdefault(k, []).append(v)
    return {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            for k, v in values.items()}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Match rate, median shape IoU, median palette error and seconds per run over one setting's
    completed runs, the mean and spread of every metric (``metrics``) and the failed runs' count.

    The match says *what* an image shows (the judge names the nearest of three shapes, so a
    blob still reads as some shape); the shape IoU says how well formed that shape is (a
    clean render about 0.97, the study's "rough shapes" about 0.6); the palette error how
    clean the colours are. Prompts outside the shapes world have no match (n/a)."""
    ok = completed(runs)
    judged = [r["metrics"].get("shapes-judge", {}) for r in ok]
    matches = [j["match"] for j in judged if "match" in j]
    ious = [j["shape_iou"] for j in judged if "shape_iou" in j]
    errors = [j["palette_error"] for j in judged if "palette_error" in j]
    return {
        "runs": len(ok),
        "match_rate": sum(matches) / len(matches) if matches else None,
        "matches": sum(matches),
        "median_shape_iou": statistics.median(ious) if ious else None,
        "median_palette_error": statistics.median(errors) if errors else None,
        "seconds_per_run": statistics.mean(r["seconds"] for r in ok) if ok else None,
        "metrics": metric_summary(ok),
        "failed": len(runs) - len(ok),
    }


def table(results: dict[str, dict[str, Any]], name: str = "recipe") -> str:
    failures = any(res["summary"].get("failed") for res in results.values())
    lines = [f"| {name} | judge match | median shape IoU | median palette error | s/run |"
             + (" failed |" if failures else ""),
             "|---|---|---|---|---|" + ("---|" if failures else "")]

    def number(value, fmt: str) -> str:
        return format(value, fmt) if value is not None else "n/a"

    for label, res in results.items():
        s = res["summary"]
        match = f"{s['matches']}/{s['runs']} ({s['match_rate']:.0%})" if s["match_rate"] is not None else "n/a"
        lines.append(f"| {label} | {match} | {number(s.get('median_shape_iou'), '.2f')} | "
                     f"{number(s['median_palette_error'], '.3f')} | {number(s['seconds_per_run'], '.1f')} |"
                     + (f" {s.get('failed', 0)} |" if failures else ""))
    return "\n".join(lines) + "\n"


def fmt(x: float) -> str:
    return f"{x:.3g}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.2e}"


def metrics_table(results: dict[str, dict[str, Any]]) -> str:
    """Mean ± spread of every metric, one row per metric, one column per setting."""
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
