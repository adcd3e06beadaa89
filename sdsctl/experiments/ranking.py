"""Ranking the settings of a sweep by one metric, with its spread over seeds (``--rank-by``).

A setting's value is the mean over seeds of its per-seed value (the mean over the sweep's
prompts for that seed); its spread is the sample standard deviation of those per-seed values,
so the spread says how much a setting's figure depends on the seed, not on the prompt.

The default ranks by the verdict of the installed metric that gives one (``Metric.verdict``;
the shapes judge's match: the share of runs whose colour, shape and background match the
prompt; higher first), ties broken by its ``tie_break`` key (the judge's palette error, lower
first) -- and by ``clip.score`` (higher first) when a CLIP model was given (``--clip``).
``--rank-by NAME`` takes any number of a run (the names of compare.json's ``summary.metrics``,
e.g. ``shapes-judge.shape_iou``, ``image-stats.sharpness``, ``seconds_per_step``); ``NAME:min``
or ``NAME:max`` says which way is better, by default lower for the keys a metric declares
(``Metric.lower_is_better``) and for times and memory, higher for everything else.

A setting whose runs all failed is ranked last, as failed, with each run's error.
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

from sdsctl.errors import SdsctlError

JUDGE = "judge"
#: the run figures for which lower is better; a metric's keys say so themselves (``Metric.lower_is_better``)
LOWER_IS_BETTER = ("seconds", "seconds_per_step", "peak_memory_mb", "convergence")


def _verdict():
    """(name, class) of the metric whose verdict ``judge`` ranks by (``summaries.verdict_metric``)."""
    from sdsctl.experiments.summaries import verdict_metric

    found = verdict_metric()
    if found is None:
        raise SdsctlError("--rank-by judge: no installed metric gives a verdict (the shapes-judge plugin does); "
                          "rank by a number instead, e.g. --rank-by image-stats.sharpness")
    return found


def _lower_is_better(name: str) -> bool:
    """Whether lower is better for the number ``name`` (``METRIC.KEY`` or a run figure)."""
    from sdsctl import plugins

    metric, _, key = name.rpartition(".")
    reg = plugins.components("metrics").get(metric) if metric else None
    return key in reg.obj.lower_is_better if reg is not None else name in LOWER_IS_BETTER


@dataclasses.dataclass(frozen=True)
class RankBy:
    metric: str  # JUDGE, or a number's name (compare.run_numbers)
    lower: bool  # lower is better

    def describe(self) -> str:
        if self.metric == JUDGE:
            _, metric = _verdict()
            tie = f", then {_label(metric, metric.tie_break)} (lower first)" if metric.tie_break else ""
            return f"{metric.verdict_words['rate']} (higher first){tie}"
        return f"{self.metric} ({'lower' if self.lower else 'higher'} first)"

    @property
    def column(self) -> str:
        return f"{_verdict()[1].verdict} rate" if self.metric == JUDGE else self.metric


def _label(metric, key: str) -> str:
    """How tables name one of a metric's keys (its headline label, else the key)."""
    return metric.headline.get(key, (key.replace("_", " "),))[0]


def parse_rank_by(text: str | None, clip: bool = False) -> RankBy:
    """``--rank-by``: ``judge``, ``NAME``, ``NAME:min`` or ``NAME:max``; None: the default."""
    if not text:
        return RankBy("clip.score", False) if clip else RankBy(JUDGE, False)
    name, _, direction = text.partition(":")
    name = name.strip()
    if not name or direction not in ("", "min", "max"):
        raise SdsctlError(f"--rank-by {text}: expected judge, METRIC, METRIC:min or METRIC:max "
                          "(e.g. --rank-by shapes-judge.shape_iou, --rank-by image-stats.clipped:min)")
    if name == JUDGE:
        return RankBy(JUDGE, False)
    lower = direction == "min" if direction else _lower_is_better(name)
    return RankBy(name, lower)


#: the run-level numbers every run has besides its metrics' (``RunData.figures``)
FIGURES = ("convergence", "seconds_per_step", "peak_memory_mb")


def check_rank_by(by: RankBy, clip: bool) -> None:
    """Refuse a ``--rank-by`` no run will have, before any run: the names are the installed
    metrics' declared keys (``Metric.keys``), the run figures and, with ``--clip``, ``clip.score``."""
    from sdsctl import plugins
    from sdsctl.engine.recipe import suggest

    if by.metric == JUDGE:
        return
    metrics = plugins.components("metrics")
    known = [*FIGURES, *(["clip.score"] if clip else [])]
    for name, reg in metrics.items():
        known += [f"{name}.{key}" for key in reg.obj.keys or ()]
    prefix = by.metric.split(".", 1)[0]
    if by.metric in known or (prefix in metrics and metrics[prefix].obj.keys is None):
        return
    hint = suggest(by.metric, known) or (" (clip.score needs --clip DIR)" if by.metric == "clip.score" else "")
    raise SdsctlError(f"--rank-by {by.metric}: no run will have a number by that name{hint}; the numbers are "
                      f"{', '.join(known)}, or judge")


def stat(values: list[float]) -> dict[str, float] | None:
    """Mean, sample standard deviation (0 for one value) and count; None without values."""
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def per_seed(runs: list[dict[str, Any]], value) -> dict[int, float]:
    """Seed -> the mean of ``value(run)`` over that seed's completed runs (runs without a value skipped)."""
    by_seed: dict[int, list[float]] = {}
    for run in runs:
        if run.get("status", "completed") != "completed":
            continue
        v = value(run)
        if v is not None:
            by_seed.setdefault(run["seed"], []).append(float(v))
    return {seed: statistics.fmean(v) for seed, v in sorted(by_seed.items())}


def _judged(key: str):
    """A run's reading of ``key`` by the verdict metric."""
    name = _verdict()[0]
    return lambda run: run.get("metrics", {}).get(name, {}).get(key)


def _number(name: str):
    from sdsctl.experiments.summaries import run_numbers

    return lambda run: run_numbers(run).get(name)


@dataclasses.dataclass
class Row:
    label: str
    value: dict[str, float] | None  # mean / std / n over seeds
    seeds: dict[int, float]
    secondary: dict[str, float] | None  # the judge's palette error (ranking by the judge)
    runs: int
    failed: int
    errors: list[str]
    seconds: float | None
    rank: int | None = None

    def as_json(self, by: RankBy) -> dict[str, Any]:
        out = {"rank": self.rank, "by": by.metric, "lower_is_better": by.lower, "value": self.value,
               "per_seed": {str(k): v for k, v in self.seeds.items()}}
        if self.secondary is not None:
            out[_verdict()[1].tie_break] = self.secondary
        return out


def rank(results: dict[str, dict[str, Any]], by: RankBy) -> list[Row]:
    """The rows of ``results`` (compare's per-label results), best first; rows without a value
    (the metric absent, or every run failed) last, in their order, unranked."""
    judge = _verdict()[1] if by.metric == JUDGE else None
    primary = _judged(judge.verdict) if judge else _number(by.metric)
    rows = []
    for label, res in results.items():
        runs = res["runs"]
        seeds = per_seed(runs, primary)
        ok = [r for r in runs if r.get("status", "completed") == "completed"]
        secondary = stat(list(per_seed(runs, _judged(judge.tie_break)).values())) if judge and judge.tie_break \
            else None
        errors = [f"{r['prompt']!r} seed {r['seed']}: {r.get('error')} ({r.get('attempts', 1)} attempts)"
                  for r in runs if r.get("status", "completed") != "completed"]
        rows.append(Row(label, stat(list(seeds.values())), seeds, secondary, len(runs), len(runs) - len(ok), errors,
                        statistics.fmean(r["seconds"] for r in ok) if ok else None))
    sign = 1 if by.lower else -1

    def key(row: Row):
        tie = row.secondary["mean"] if row.secondary else float("inf")
        return (sign * row.value["mean"], tie)

    ranked = sorted((r for r in rows if r.value is not None), key=key)
    for i, row in enumerate(ranked, 1):
        row.rank = i
    rest = [r for r in rows if r.value is None]
    return ranked + sorted(rest, key=lambda r: r.failed == r.runs)


def _cell(value: dict[str, float] | None, judge: bool) -> str:
    from sdsctl.experiments.summaries import fmt

    if value is None:
        return "n/a"
    if judge:
        return f"{value['mean']:.0%} ± {value['std']:.0%}"
    return f"{fmt(value['mean'])} ± {fmt(value['std'])}"


def cells(row: Row, by: RankBy) -> list[str]:
    """A row as the table shows it: rank, setting, value, [the verdict's tie-break], runs, s/run."""
    judge = by.metric == JUDGE
    value = "failed" if row.failed == row.runs else _cell(row.value, judge)
    out = [str(row.rank) if row.rank else "–", row.label, value]
    if judge and _verdict()[1].tie_break:
        out.append(_cell(row.secondary, False))
    runs = f"{row.runs - row.failed}/{row.runs}" + (f", {row.failed} failed" if row.failed else "")
    out += [runs, f"{row.seconds:.1f}" if row.seconds is not None else "n/a"]
    return out


def headers(by: RankBy) -> list[str]:
    out = ["rank", "setting", f"{by.column} (mean ± spread over seeds)"]
    if by.metric == JUDGE and _verdict()[1].tie_break:
        metric = _verdict()[1]
        out.append(_label(metric, metric.tie_break))
    return out + ["runs ok", "s/run"]


def note(rows: list[Row], by: RankBy) -> str | None:
    """Why nothing could be ranked, when nothing could."""
    if any(r.rank for r in rows) or all(r.failed == r.runs for r in rows):
        return None
    if by.metric == JUDGE:
        return (f"not ranked: {_verdict()[0]} gives no verdict on these prompts (outside its world); "
                "rank by another number, e.g. --rank-by image-stats.sharpness, or give --clip DIR")
    return f"not ranked: no run has a number named {by.metric} (compare.json's summary.metrics names them)"


def ranked_table(rows: list[Row], by: RankBy) -> str:
    """The ranking as markdown: the table, then every failed run with its error."""
    lines = [f"Ranked by {by.describe()}.", "", "| " + " | ".join(headers(by)) + " |",
             "|" + "---|" * len(headers(by))]
    lines += ["| " + " | ".join(cells(r, by)) + " |" for r in rows]
    why = note(rows, by)
    if why:
        lines += ["", why]
    failures = [f"- {r.label}: {e}" for r in rows for e in r.errors]
    if failures:
        lines += ["", "Failed runs:", *failures]
    return "\n".join(lines) + "\n"
