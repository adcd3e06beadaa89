"""A comparison's numbers: every number of a run, and per setting its match rate, medians,
and the mean and spread of every metric -- read by ``compare.md``, ``report.html`` and the
sweep's ranking alike (``sdsctl.experiments.compare`` writes them, ``sdsctl.experiments.report`` and
``sdsctl.experiments.ranking`` read them; none of them imports another for these).
"""

from __future__ import annotations

import statistics
from pathlib import Path
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


def readings(run: dict[str, Any]) -> list[dict[str, Any]]:
    """What the metrics read in a run: one image's readings, or each held-out view's (a 3D
    run: what a setting's rates, medians, means and spreads count)."""
    views = run.get("views")
    return [view.get("metrics", {}) for view in views] if views else [run.get("metrics", {})]


def run_numbers(run: dict[str, Any]) -> dict[str, float]:
    """Every number of one run: its metrics (``shapes-judge.shape_iou``, ...; a 3D run's mean
    over its views) and its figures."""
    samples = [_numbers(reading) for reading in readings(run)]
    keys = dict.fromkeys(k for sample in samples for k in sample)
    numbers = {k: statistics.fmean(s[k] for s in samples if k in s) for k in keys}
    numbers.update(_numbers({k: v for k, v in run.get("figures", {}).items() if v is not None}))
    return numbers


def completed(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs that finished (a failed run has no figures to average)."""
    return [r for r in runs if r.get("status", "completed") == "completed"]


def metric_summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, spread (sample standard deviation; 0 for one value) and count of every number over
    runs -- a 3D run's metric readings counted once per held-out view, its figures once."""
    values: dict[str, list[float]] = {}
    for run in completed(runs):
        for reading in readings(run):
            for k, v in _numbers(reading).items():
                values.setdefault(k, []).append(v)
        for k, v in _numbers({k: v for k, v in run.get("figures", {}).items() if v is not None}).items():
            values.setdefault(k, []).append(v)
    return {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            for k, v in values.items()}


def verdict_metric() -> tuple[str, Any] | None:
    """(name, class) of the first installed metric that gives a verdict (``Metric.verdict``,
    the shapes judge's ``match``), or None: what compare counts, shows and ranks by default."""
    from sdsctl import plugins

    for name, reg in plugins.components("metrics").items():
        if reg.obj.verdict:
            return name, reg.obj
    return None


def verdict_word(run: dict[str, Any], found: tuple[str, Any] | None) -> str:
    """What the verdict metric ``found`` (:func:`verdict_metric`'s answer, asked once for a page
    of runs) says of one completed run, in its own words (``match``, ``miss``, ``judge n/a``);
    ``n/a`` without a verdict metric."""
    if found is None:
        return "n/a"
    name, metric = found
    words = metric.verdict_words
    if run.get("views"):  # a 3D run: how many of its held-out views
        said = [view.get("metrics", {}).get(name, {}).get(metric.verdict) for view in run["views"]]
        return f"{sum(value is True for value in said)}/{len(said)} views {words['yes']}"
    value = run.get("metrics", {}).get(name, {}).get(metric.verdict)
    return {True: words["yes"], False: words["no"]}.get(value, words["none"])


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The verdict's rate and count and the medians of the verdict metric's headline keys
    (``Metric.headline``; the shapes judge's: shape IoU and palette error) and seconds per run
    over one setting's completed runs, the mean and spread of every metric (``metrics``) and the
    failed runs' count. A run outside the verdict metric's world has no verdict (n/a)."""
    ok = completed(runs)
    name, metric = verdict_metric() or (None, None)
    judged = [reading.get(name, {}) for r in ok for reading in readings(r)] if metric else []
    verdicts = [j[metric.verdict] for j in judged if metric.verdict in j] if metric else []
    views = any(r.get("views") for r in ok)
    out: dict[str, Any] = {"runs": len(ok), "match_rate": sum(verdicts) / len(verdicts) if verdicts else None,
                           "matches": sum(verdicts), "judged": len(verdicts), "unit": "views" if views else "runs"}
    if views and metric:
        out["worst_view"] = worst_view(ok, name, metric)
    for key in (metric.headline if metric else {}):
        values = [j[key] for j in judged if key in j]
        out[f"median_{key}"] = statistics.median(values) if values else None
    out.update({"seconds_per_run": statistics.mean(r["seconds"] for r in ok) if ok else None,
                "metrics": metric_summary(ok), "failed": len(runs) - len(ok)})
    return out


def worst_view(runs: list[dict[str, Any]], name: str, metric: Any) -> dict[str, Any] | None:
    """The held-out view the verdict metric likes least: a view it does not match before one it
    does, then the worst ``tie_break`` reading (e.g. the highest palette error)."""
    worst, worst_key = None, None
    lower = metric.tie_break in metric.lower_is_better
    for run in runs:
        for view in run.get("views", []):
            reading = view.get("metrics", {}).get(name, {})
            value = reading.get(metric.tie_break)
            if value is None:
                continue
            key = (bool(reading.get(metric.verdict)), -value if lower else value)
            if worst_key is None or key < worst_key:
                worst_key = key
                worst = {"prompt": run["prompt"], "seed": run["seed"], "camera": view["camera"],
                         "file": str(Path(run["run_dir"]) / view["file"]), metric.tie_break: value,
                         metric.verdict: reading.get(metric.verdict)}
    return worst


def verdict_cell(s: dict[str, Any]) -> str:
    """``6/8 (75%)``, or ``42/64 views (66%)`` for 3D runs, or ``n/a``."""
    if s["match_rate"] is None:
        return "n/a"
    return f"{verdict_count(s)} ({s['match_rate']:.0%})"


def verdict_count(s: dict[str, Any]) -> str:
    """``6/8`` (matches over runs), or ``42/64 views`` (over the held-out views of 3D runs)."""
    if s.get("unit") == "views":
        return f"{s['matches']}/{s['judged']} views"
    return f"{s['matches']}/{s['runs']}"


def table(results: dict[str, dict[str, Any]], name: str = "recipe") -> str:
    """compare.md's first table: per setting the verdict count, the headline medians, s/run."""
    metric = (verdict_metric() or (None, None))[1]
    heads = list(metric.headline.items()) if metric else []
    column = metric.verdict_words["column"] if metric else "verdict"
    failures = any(res["summary"].get("failed") for res in results.values())
    lines = [f"| {name} | {column} | " + "".join(f"median {label} | " for _, (label, _) in heads) + "s/run |"
             + (" failed |" if failures else ""),
             "|---|---|" + "---|" * len(heads) + "---|" + ("---|" if failures else "")]

    def number(value, fmt: str) -> str:
        return format(value, fmt) if value is not None else "n/a"

    for label, res in results.items():
        s = res["summary"]
        match = verdict_cell(s)
        medians = "".join(f"{number(s.get(f'median_{key}'), form)} | " for key, (_, form) in heads)
        lines.append(f"| {label} | {match} | {medians}{number(s['seconds_per_run'], '.1f')} |"
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
