"""``report.html``: one self-contained page that reads a comparison or a sweep (``sdsctl compare``,
``sdsctl sweep``).

Everything is in the file: the final images are embedded as ``data:`` URIs, the curves are
inline SVG, the style is inline; there is no script and nothing is fetched, so the page
opens the same from a laptop, a mail attachment or a CI artefact. Only the links to each
run's ``progress.png`` point outside it (relative paths into ``runs/``). Sections:

0. for a sweep, the settings ranked (``sdsctl.experiments.ranking``), with every failed run's error;
1. the grid of final images (a row per recipe, a column per prompt and seed);
2. a table of every metric per recipe (mean ± sample standard deviation over the runs);
3. the curves over steps of every number the runs logged (loss, score norm, the guidance's
   terms, t, the weight), one line per recipe: the mean over its runs, smoothed;
4. each recipe's differences from the first (recipe keys, metrics, images) side by side;
5. every run with its figures and a link to its progress image.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageSequence

from sdsctl.engine.rundir import atomic_write_text
from sdsctl.engine.runread import RunData
from sdsctl.experiments.summaries import fmt, verdict_count, verdict_metric, verdict_word

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#17becf", "#8c564b", "#e377c2"]

CSS = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #222; max-width: 1400px; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 6px 0; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.grid th.col { font-weight: normal; font-size: 12px; width: 104px; }
table.grid td { text-align: center; padding: 2px; }
table.grid img, .pair img { image-rendering: pixelated; display: block; margin: auto; border: 1px solid #ccc; }
.small { font-size: 11px; color: #666; } .note { color: #8a5a00; } .better { color: #1a7f37; }
.worse { color: #b42318; }
.plots { display: flex; flex-wrap: wrap; gap: 12px; } .plots figure { margin: 0; }
figcaption { font-size: 12px; text-align: center; }
.legend span { display: inline-block; margin-right: 14px; }
.legend i { display: inline-block; width: 14px; height: 3px; vertical-align: middle; margin-right: 4px; }
.diff { display: flex; gap: 24px; flex-wrap: wrap; }
.pair { display: inline-block; margin: 2px 8px 2px 0; text-align: center; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _webp_uri(frames: list[Image.Image], **options) -> str:
    """Pictures (one, or an animation's frames) as a lossy WebP ``data:`` URI."""
    buffer = io.BytesIO()
    frames[0].save(buffer, format="WEBP", save_all=len(frames) > 1, append_images=frames[1:], **options)
    return "data:image/webp;base64," + base64.b64encode(buffer.getvalue()).decode()


def turntable_uri(path: Path, size: int) -> str:
    """A run's turntable (an animated GIF) as an animated WebP ``data:`` URI, every frame scaled to
    ``size`` pixels a side. The GIF is written at the render size (36 frames of 256 px, about
    600 KB); even scaled to 96 px a GIF of a NeRF's soft gradients stays about 200 KB, and a page
    of 144 runs weighed 100 MB, then 41 MB. As a lossy WebP the same turntable is about 17 KB
    (every browser shows animated WebP)."""
    with Image.open(path) as gif:
        duration, loop = gif.info.get("duration", 80), gif.info.get("loop", 0)
        frames = [frame.convert("RGB").resize((size, size), Image.Resampling.BOX)
                  for frame in ImageSequence.Iterator(gif)]
    return _webp_uri(frames, duration=duration, loop=loop, quality=75, method=4)


def thumbnail_uri(path: Path, size: int) -> str:
    """A picture as a WebP ``data:`` URI at ``size`` pixels a side (a held-out view is written at the
    render size and shown at 24 px: 144 runs' 8 views embedded as PNGs were 6 MB of a page; as
    48 px WebPs, under 0.5 MB)."""
    with Image.open(path) as picture:
        return _webp_uri([picture.convert("RGB").resize((size, size), Image.Resampling.BOX)], quality=80)


def _img(path: Path, size: int, title: str) -> str:
    return f'<img src="{data_uri(path)}" width="{size}" height="{size}" alt="{_e(title)}" title="{_e(title)}">'


def _rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def _series(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Every numeric field of metrics.jsonl as (step, value) lists: loss, norms.*, t, weight, lr."""
    out: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        values = {"loss": r.get("loss"), **{f"norm {k}": v for k, v in r.get("norms", {}).items()},
                  "t": r.get("t"), "weight": r.get("weight"), "lr": r.get("lr")}
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                out.setdefault(k, []).append((r["step"], float(v)))
    return out


def _mean_curve(runs: list[dict[str, list[tuple[int, float]]]], key: str, points: int = 150) -> list[tuple[int, float]]:
    """The mean over runs at each step, then a moving average (window: 1/50 of the steps), at most ``points`` points."""
    by_step: dict[int, list[float]] = {}
    for series in runs:
        for step, v in series.get(key, []):
            by_step.setdefault(step, []).append(v)
    steps = sorted(by_step)
    if not steps:
        return []
    mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
    w = max(1, len(steps) // 50)
    smooth, acc = [], 0.0
    for i, v in enumerate(mean):
        acc += v
        if i >= w:
            acc -= mean[i - w]
        smooth.append(acc / min(i + 1, w))
    stride = max(1, len(steps) // points)
    keep = list(range(0, len(steps), stride))
    if keep[-1] != len(steps) - 1:
        keep.append(len(steps) - 1)
    return [(steps[i], smooth[i]) for i in keep]


def _same_as(curves: dict[str, list[tuple[int, float]]]) -> dict[str, str]:
    """Recipe -> the earlier recipe whose curve it coincides with (same steps, values equal to
    1e-9): drawn over each other, the later one would hide the earlier."""
    same: dict[str, str] = {}
    names = [n for n, c in curves.items() if c]
    for i, name in enumerate(names):
        for other in names[:i]:
            a, b = curves[name], curves[other]
            if other not in same and len(a) == len(b) and all(
                    sa == sb and math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-12) for (sa, va), (sb, vb) in zip(a, b)):
                same[name] = other
                break
    return same


def _y_range(values: list[float], log: bool) -> tuple[float, float]:
    """The y axis's ends (log10 units when ``log``); a constant series gets a range around its value."""
    f = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = f(min(values)), f(max(values))
    if hi - lo < 1e-12:
        pad = 0.05 if log else (abs(lo) * 0.05 or 0.5)
        lo, hi = lo - pad, hi + pad
    return lo, hi


def svg_plot(title: str, curves: dict[str, list[tuple[int, float]]], colors: dict[str, str],
             width: int = 420, height: int = 220) -> str:
    """A line plot as inline SVG: one polyline per recipe, axes with their ranges; log y (said on
    the axis) for wide ranges; a curve that coincides with an earlier one is dashed and named."""
    values = [v for c in curves.values() for _, v in c]
    steps = [s for c in curves.values() for s, _ in c]
    if not values:
        return ""
    log = min(values) > 0 and max(values) / min(values) > 50
    left, right, top, bottom = 56, 10, 20 if log else 10, 30  # room for "(log y)" above the axis
    f = (lambda v: math.log10(v)) if log else (lambda v: v)
    lo, hi = _y_range(values, log)
    s0, s1 = min(steps), max(steps)
    s1 = s1 if s1 > s0 else s0 + 1

    def xy(s: int, v: float) -> str:
        x = left + (s - s0) / (s1 - s0) * (width - left - right)
        y = top + (hi - f(v)) / (hi - lo) * (height - top - bottom)
        return f"{x:.1f},{y:.1f}"

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="plot" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{_e(title)}">',
             f'<rect x="{left}" y="{top}" width="{width - left - right}" height="{height - top - bottom}" '
             'fill="#fafafa" stroke="#ccc"/>']
    for frac in (0.0, 0.5, 1.0):
        v = lo + frac * (hi - lo)
        label = fmt(10**v if log else v)
        y = top + (1 - frac) * (height - top - bottom)
        parts.append(f'<text x="{left - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{label}</text>')
        if 0 < frac < 1:
            parts.append(f'<line x1="{left}" x2="{width - right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e4e4e4"/>')
    for s, anchor, x in ((s0, "start", left), (s1, "end", width - right)):
        parts.append(f'<text x="{x}" y="{height - 14}" font-size="10" text-anchor="{anchor}">{s}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 3}" font-size="10" text-anchor="middle">'
                 f'step{" (log y)" if log else ""}</text>')
    if log:  # the y axis says it too, above its top label
        parts.append(f'<text x="{left - 4}" y="{top - 8}" font-size="9" text-anchor="end">(log y)</text>')
    same = _same_as(curves)
    for name, curve in curves.items():
        if curve:
            pts = " ".join(xy(s, v) for s, v in curve)
            dash = ' stroke-dasharray="5,4"' if name in same else ""
            parts.append(f'<polyline fill="none" stroke="{colors[name]}" stroke-width="1.6"{dash} points="{pts}">'
                         f'<title>{_e(name)}</title></polyline>')
    for i, (name, other) in enumerate(same.items()):
        parts.append(f'<text x="{width - right - 4}" y="{top + 12 + 11 * i}" font-size="9" text-anchor="end" '
                     f'fill="{colors[name]}">{_e(name)}: identical to {_e(other)} (dashed)</text>')
    parts.append("</svg>")
    return "".join(parts)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _metric_cell(m: dict[str, float] | None) -> str:
    if not m:
        return '<td class="num">n/a</td>'
    return f'<td class="num">{fmt(m["mean"])} <span class="small">± {fmt(m["std"])}</span></td>'


def _ok(run: dict[str, Any]) -> bool:
    return run.get("status", "completed") == "completed"


def _ranking(rows, by) -> list[str]:
    from sdsctl.experiments.ranking import cells, headers, note

    h = ["<h2>Ranking</h2>", f'<p class="small">Ranked by {_e(by.describe())}; mean ± sample standard deviation '
         "over seeds (each seed's value the mean over the prompts).</p>",
         '<table class="ranking"><thead><tr>' + "".join(f"<th>{_e(x)}</th>" for x in headers(by))
         + "</tr></thead><tbody>"]
    for row in rows:
        values = cells(row, by)
        h.append("<tr>" + "".join(f"<td>{_e(v)}</td>" if i == 1 else f'<td class="num">{_e(v)}</td>'
                                  for i, v in enumerate(values)) + "</tr>")
    h.append("</tbody></table>")
    why = note(rows, by)
    if why:
        h.append(f'<p class="note">{_e(why)}</p>')
    failures = [(row.label, e) for row in rows for e in row.errors]
    if failures:
        h.append('<p class="worse">Failed runs:</p><ul>'
                 + "".join(f"<li>{_e(lab)}: {_e(e)}</li>" for lab, e in failures) + "</ul>")
    return h


def _head(out: Path, results: dict[str, dict[str, Any]], pairs: list[tuple[str, int]], notes: list[str],
          unknown: dict[str, list[str]] | None, kind: str) -> list[str]:
    """The page's head, title line and notes (words the model does not know)."""
    labels = list(results)
    h: list[str] = ['<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">',
                    f"<title>sdsctl {_e(kind)}</title>", f"<style>{CSS}</style></head><body>"]
    n_runs = sum(len(res["runs"]) for res in results.values())
    failed = sum(not _ok(r) for res in results.values() for r in res["runs"])
    rows_word = "settings" if kind == "sweep" else "recipes"
    h.append(f"<h1>sdsctl {_e(kind)}</h1>")
    h.append(f'<p class="small">{len(labels)} {rows_word} × {len(pairs)} (prompt, seed) pairs = {n_runs} runs'
             + (f' · <span class="worse">{failed} failed</span>' if failed else "") + f" · {_e(out)}</p>")
    for note in notes:
        h.append(f'<p class="note">{_e(note)}</p>')
    for prompt, words in (unknown or {}).items():
        h.append(f'<p class="note">{_e(prompt)!s}: the model has no whole-word token for {_e(", ".join(words))}; '
                 "it has never seen these words.</p>")
    return h


def _grid(out: Path, results: dict[str, dict[str, Any]], pairs: list[tuple[str, int]],
          colors: dict[str, str]) -> list[str]:
    """1. The final images, one row per recipe, one column per (prompt, seed) pair."""
    h: list[str] = []
    found = verdict_metric()  # once for the page
    h.append("<h2>Final images</h2>")
    h.append('<table class="grid"><thead><tr><th></th>')
    for prompt, seed in pairs:
        h.append(f'<th class="col">{_e(prompt)}<br><span class="small">seed {seed}</span></th>')
    h.append("</tr></thead><tbody>")
    for lab, res in results.items():
        h.append(f'<tr><th><span style="color:{colors[lab]}">■</span> {_e(lab)}</th>')
        for r in res["runs"]:
            run_dir = Path(r["run_dir"])
            if not _ok(r):
                h.append(f'<td title="{_e(r.get("error"))}"><span class="worse">failed</span></td>')
                continue
            title = f"{lab}: {r['prompt']}, seed {r['seed']}"
            if r.get("views"):  # a 3D run: its turntable (animated) and held-out views
                h.append(_scene_cell(out, r, run_dir, title, found))
                continue
            verdict = verdict_word(r, found)
            h.append(f'<td><a href="{_e(_rel(run_dir / "progress.png", out))}">'
                     f'{_img(run_dir / "final.png", 96, title)}</a>'
                     f'<span class="small">{verdict}</span></td>')
        h.append("</tr>")
    h.append('</tbody></table><p class="small">Click an image for the run\'s progress sheet '
             '(previews over the steps).</p>')
    return h


def _scene_cell(out: Path, run: dict[str, Any], run_dir: Path, title: str, found) -> str:
    """A 3D run's cell: its turntable (animated, embedded) above its held-out views, and
    how many of them the verdict metric matches."""
    turntable = run_dir / "turntable.gif"
    top = (f'<img src="{turntable_uri(turntable, 96)}" width="96" '
           f'height="96" alt="{_e(title)}" title="{_e(title)} (turntable)">' if turntable.is_file()
           else _img(run_dir / "final.png", 96, title))
    views = "".join(f'<img src="{thumbnail_uri(run_dir / v["file"], 48)}" width="24" height="24" '
                    f'alt="{_e(title)}" title="{_e(title)}: az {v["camera"]["azimuth"]:g}°">'
                    for v in run["views"] if (run_dir / v["file"]).is_file())
    return (f'<td><a href="{_e(_rel(run_dir / "views.png", out))}">{top}</a>'
            f'<div style="display:grid;grid-template-columns:repeat(4,24px);gap:0 0">{views}</div>'
            f'<span class="small">{_e(verdict_word(run, found))}</span></td>')


def _metrics_table(results: dict[str, dict[str, Any]], names: list[str]) -> list[str]:
    """2. Every metric's mean and spread per recipe."""
    h: list[str] = []
    h.append("<h2>Metrics per recipe</h2>")
    h.append('<p class="small">Mean ± sample standard deviation over each recipe\'s runs; true/false figures '
             "(judge matches) as rates. convergence: mean absolute change of the image over the last tenth "
             "of the run; peak_memory_mb on the CPU is the process's peak RSS.</p>")
    h.append('<table class="metrics"><thead><tr><th>metric</th>'
             + "".join(f"<th>{_e(lab)}</th>" for lab in results) + "</tr></thead><tbody>")
    found = verdict_metric()
    column = found[1].verdict_words["column"] if found else "verdict"
    h.append(f"<tr><td>{_e(column)}</td>" + "".join(
        f'<td class="num">{verdict_count(res["summary"])}</td>'
        if res["summary"]["match_rate"] is not None else '<td class="num">n/a</td>'
        for res in results.values()) + "</tr>")
    if any(res["summary"].get("worst_view") for res in results.values()):
        h.append("<tr><td>worst view</td>" + "".join(_worst_cell(res["summary"].get("worst_view"))
                                                      for res in results.values()) + "</tr>")
    for k in names:
        cells = "".join(_metric_cell(res["summary"]["metrics"].get(k)) for res in results.values())
        h.append(f"<tr><td>{_e(k)}</td>{cells}</tr>")
    h.append("</tbody></table>")
    return h


def _worst_cell(worst: dict[str, Any] | None) -> str:
    """A 3D setting's worst held-out view: its picture, prompt, seed and camera."""
    if not worst:
        return '<td class="num">n/a</td>'
    camera = worst["camera"]
    label = (f"{worst['prompt']}, seed {worst['seed']}, az {camera['azimuth']:g}° el {camera['elevation']:g}°")
    picture = _img(Path(worst["file"]), 48, label) if Path(worst["file"]).is_file() else ""
    return f'<td>{picture}<br><span class="small">{_e(label)}</span></td>'


def _curves(results: dict[str, dict[str, Any]], colors: dict[str, str]) -> list[str]:
    """3. The curves over steps, each recipe's mean over its runs."""
    h: list[str] = []
    labels = list(results)
    runs_data = {lab: [RunData.read(Path(r["run_dir"])) for r in res["runs"] if _ok(r)]
                 for lab, res in results.items()}
    h.append("<h2>Curves over steps</h2>")
    h.append('<p class="legend">'
             + "".join(f'<span><i style="background:{colors[lab]}"></i>{_e(lab)}</span>' for lab in labels)
             + '<span class="small">mean over the recipe\'s runs, moving average over 1/50 of the steps</span></p>')
    series = {lab: [_series(d.records) for d in data] for lab, data in runs_data.items()}
    keys = list(dict.fromkeys(k for runs in series.values() for s in runs for k in s))
    h.append('<div class="plots">')
    for key in keys:
        curves = {lab: _mean_curve(series[lab], key) for lab in labels}
        flat = [v for c in curves.values() for _, v in c]
        if not flat or (key == "lr" and max(flat) == min(flat)):
            continue
        h.append(f"<figure>{svg_plot(key, curves, colors)}<figcaption>{_e(key)}</figcaption></figure>")
    h.append("</div>")
    return h


def _differences(results: dict[str, dict[str, Any]], colors: dict[str, str], names: list[str]) -> list[str]:
    """4. Each recipe against the first: its recipe keys that differ, its metrics' Δ, its images beside."""
    h: list[str] = []
    labels = list(results)
    first = labels[0]
    base = _flat(results[first].get("resolved", {}))
    h.append(f"<h2>Differences from {_e(first)}</h2>")
    for lab in labels[1:]:
        this = _flat(results[lab].get("resolved", {}))
        keys_diff = [k for k in dict.fromkeys([*base, *this])
                     if base.get(k) != this.get(k) and k not in ("prompt", "seed")]
        h.append(f'<h3><span style="color:{colors[lab]}">■</span> {_e(lab)}</h3><div class="diff">')
        h.append(f"<table><thead><tr><th>recipe key</th><th>{_e(first)}</th><th>{_e(lab)}</th></tr></thead><tbody>")
        for k in keys_diff or []:
            h.append(f"<tr><td>{_e(k)}</td><td>{_e(base.get(k, '—'))}</td><td>{_e(this.get(k, '—'))}</td></tr>")
        if not keys_diff:
            h.append('<tr><td colspan="3">same resolved recipe</td></tr>')
        h.append("</tbody></table>")
        h.append(f"<table><thead><tr><th>metric</th><th>{_e(first)}</th><th>{_e(lab)}</th><th>Δ</th></tr></thead><tbody>")
        a, b = results[first]["summary"]["metrics"], results[lab]["summary"]["metrics"]
        for k in [k for k in names if k in a and k in b]:
            d = b[k]["mean"] - a[k]["mean"]
            h.append(f'<tr><td>{_e(k)}</td><td class="num">{fmt(a[k]["mean"])}</td>'
                     f'<td class="num">{fmt(b[k]["mean"])}</td>'
                     f'<td class="num">{"+" if d > 0 else ""}{fmt(d)}</td></tr>')
        h.append("</tbody></table><div>")
        for ra, rb in zip(results[first]["runs"], results[lab]["runs"]):
            if not (_ok(ra) and _ok(rb)):
                continue
            h.append(f'<div class="pair">{_img(Path(ra["run_dir"]) / "final.png", 64, first)}'
                     f'{_img(Path(rb["run_dir"]) / "final.png", 64, lab)}'
                     f'<span class="small">seed {ra["seed"]}</span></div>')
        h.append("</div></div>")
    return h


def _runs_table(out: Path, results: dict[str, dict[str, Any]], kind: str) -> list[str]:
    """5. Every run with its figures and a link to its progress image."""
    h: list[str] = []
    h.append(f"<h2>Runs</h2><table><thead><tr><th>{'setting' if kind == 'sweep' else 'recipe'}</th>"
             "<th>prompt</th><th>seed</th><th>s</th>"
             "<th>s/step</th><th>convergence</th><th></th><th>run</th></tr></thead><tbody>")
    for lab, res in results.items():
        for r in res["runs"]:
            fig = r.get("figures", {})
            run_dir = Path(r["run_dir"])
            if not _ok(r):
                h.append(f"<tr><td>{_e(lab)}</td><td>{_e(r['prompt'])}</td><td class=\"num\">{r['seed']}</td>"
                         f'<td colspan="4" class="worse">failed after {r.get("attempts", 1)} attempt(s): '
                         f'{_e(r.get("error"))}</td>'
                         f'<td><span class="small">{_e(_rel(run_dir, out))}</span></td></tr>')
                continue
            h.append(f"<tr><td>{_e(lab)}</td><td>{_e(r['prompt'])}</td><td class=\"num\">{r['seed']}</td>"
                     f'<td class="num">{r["seconds"]:.1f}</td>'
                     f'<td class="num">{fmt(fig["seconds_per_step"]) if fig.get("seconds_per_step") else "n/a"}</td>'
                     f'<td class="num">{fmt(fig["convergence"]) if fig.get("convergence") is not None else "n/a"}</td>'
                     f'<td class="small">{"reused" if r.get("reused") else ""}</td>'
                     f'<td><a href="{_e(_rel(run_dir / "progress.png", out))}">progress.png</a> · '
                     f'<span class="small">{_e(_rel(run_dir, out))}</span></td></tr>')
    return h


def render(out: Path, results: dict[str, dict[str, Any]], pairs: list[tuple[str, int]],
           notes: list[str] = (), unknown: dict[str, list[str]] | None = None, ranking=None,
           kind: str = "compare") -> str:
    labels = list(results)
    colors = {lab: COLORS[i % len(COLORS)] for i, lab in enumerate(labels)}
    names = list(dict.fromkeys(k for res in results.values() for k in res["summary"]["metrics"]))
    h = _head(out, results, pairs, notes, unknown, kind)
    if ranking is not None:
        h += _ranking(*ranking)
    h += _grid(out, results, pairs, colors)
    h += _metrics_table(results, names)
    h += _curves(results, colors)
    if len(labels) > 1:
        h += _differences(results, colors, names)
    h += _runs_table(out, results, kind)
    h.append("</tbody></table></body></html>")
    return "\n".join(h) + "\n"


def write_report(out: Path, results: dict[str, dict[str, Any]], pairs: list[tuple[str, int]],
                 notes: list[str] = (), unknown: dict[str, list[str]] | None = None, ranking=None,
                 kind: str = "compare") -> Path:
    """``ranking``: (rows, RankBy) of ``sdsctl.experiments.ranking``, shown first; ``kind``: compare or sweep."""
    path = Path(out) / "report.html"
    atomic_write_text(path, render(Path(out), results, pairs, notes, unknown, ranking, kind))
    return path
