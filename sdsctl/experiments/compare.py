"""Comparing recipes, and sweeping one recipe's values: plan → execute → collect → write.

``sdsctl compare A.yaml B.yaml --pairs 8 --out DIR`` and ``sdsctl sweep R.yaml --grid K=V1,V2
--out DIR`` are one code path (:func:`run_settings`); they differ only in their settings, the
rows of the report (one per recipe, one per grid point). For every setting and every
(prompt, seed) pair:

1. **plan** (``sdsctl.experiments.plan``): validate every setting before any run; key each run's folder by
   its resolved recipe, and find which folders hold a finished run (reused), an interrupted
   one (continued) or nothing yet;
2. **execute** (``sdsctl.experiments.executors``): the runs that are not reused, here, in ``--jobs``
   worker processes or as Ray tasks; a failed run is retried once, then reported;
3. **collect**: each run's metrics, figures and status, and per setting a summary (match
   rate, medians, mean and spread of every metric) and, for a sweep, its rank
   (``sdsctl.experiments.ranking``);
4. **write** into ``DIR``:

- ``compare.json``: per setting, every run's prompt, seed, seconds, metrics, figures, status
  and run directory, and a summary;
- ``compare.md``: for a sweep the ranked table first; one row per setting (match rate,
  median shape IoU, median palette error, seconds per run), then the mean ± spread of every
  metric;
- ``grid.png``: the final images, one labelled row per setting, one column per pair;
- ``report.html``: the self-contained report (``sdsctl.experiments.report``).

Calling the same comparison again reuses every completed run and continues interrupted
ones (as ``sdsctl resume`` does), whichever executor ran them.

Without ``--prompt`` the pairs are prompts of the shapes world (``a {color} {shape} on a
{background} background``), drawn from a fixed seed so every comparison sees the same ones.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sdsctl.engine.images import save_image
from sdsctl.engine.rundir import atomic_write_json, atomic_write_text
from sdsctl.errors import SdsctlError
from sdsctl.experiments.executors import Events, Interrupted, LocalExecutor
from sdsctl.experiments.plan import Setting, entries, plan, shapes_pairs, unknown_words  # noqa: F401 - shapes_pairs: public here too
from sdsctl.experiments.runtask import Outcome, Quiet
from sdsctl.experiments.summaries import (  # noqa: F401 -- re-exported
    completed,
    fmt,
    metric_summary,
    metrics_table,
    run_numbers,
    summarize,
    table,
    verdict_metric,
    verdict_word,
)

#: a run of the comparison was interrupted (Ctrl-C); its state is saved (the same call continues it)
CompareInterrupted = Interrupted
class Progress:
    """Runs done, reused and the ETA of a comparison (estimated from the steps of runs executed here)."""

    def __init__(self, total_runs: int, total_steps: int, kind: str = "compare"):
        self.total_runs, self.total_steps = total_runs, total_steps
        self.kind = kind
        self.done = self.reused = self.continued = self.failed = 0
        self.steps_left = total_steps
        self.run_steps = 0
        self.run_seconds = 0.0
        self.now_steps, self.now_seconds = 0, 0.0  # the run going on: its steps so far and their time
        self.started = time.perf_counter()
        self.current = ""

    def running(self, steps: int, seconds: float) -> None:
        """The run going on has taken ``steps`` steps in ``seconds``: the ETA moves with it."""
        self.now_steps, self.now_seconds = steps, seconds

    def finish(self, steps: int, seconds: float | None) -> None:
        """A run finished; ``seconds`` None when it was reused (no time spent here)."""
        self.done += 1
        self.steps_left -= steps
        self.now_steps, self.now_seconds = 0, 0.0
        if seconds is not None:
            self.run_steps += steps
            self.run_seconds += seconds

    def eta(self) -> str:
        import datetime

        steps, seconds = self.run_steps + self.now_steps, self.run_seconds + self.now_seconds
        if not steps:
            return "?"
        return str(datetime.timedelta(seconds=int(max(self.steps_left - self.now_steps, 0) * seconds / steps)))

    def line(self) -> str:
        import datetime

        elapsed = datetime.timedelta(seconds=int(time.perf_counter() - self.started))
        reused = f", {self.reused} reused" if self.reused else ""
        failed = f", {self.failed} failed" if self.failed else ""
        now = f" · now {self.current}" if self.current else ""
        return (f"{self.kind}: {self.done}/{self.total_runs} runs done{reused}{failed} · elapsed {elapsed} · "
                f"ETA {self.eta()}{now}")


def _live_reporter(progress: Progress):
    """The run's live panel with the comparison's progress line above it."""
    from sdsctl.engine.panel import LivePanel

    class CompareLive(LivePanel):
        def step(self, record):
            super().step(record)
            if self.info is not None:  # the comparison's ETA moves with the run's steps
                progress.running(record["step"] - self.info["start_step"], time.perf_counter() - self.started)

        def render(self):
            from rich.console import Group
            from rich.text import Text

            return Group(Text(progress.line(), style="bold"), super().render())

    return CompareLive()


# ----------------------------------------------------------------------------- execute and collect

class _Driver(Events):
    """Hears the executor: keeps the progress, prints a line per run, collects each run as it ends."""

    def __init__(self, progress: Progress, echo, live: bool, scorer, sequential: bool):
        self.progress, self.echo, self.live, self.scorer = progress, echo, live, scorer
        self.sequential = sequential
        self.runs: dict[int, dict[str, Any]] = {}

    def reporter(self, spec):
        return _live_reporter(self.progress) if self.live else Quiet()

    def started(self, spec) -> None:
        if self.sequential:
            self.progress.current = spec.describe()
            if not self.live:
                self.echo(self.progress.line())

    def retrying(self, spec, outcome: Outcome) -> None:
        self.echo(f"{spec.describe()}: attempt {outcome.attempts} {outcome.status}: {outcome.error}; "
                  "trying once more from the start")

    def finished(self, spec, outcome: Outcome | None) -> None:
        """``outcome`` None: a reused run."""
        run = collect_run(spec, outcome, self.scorer)
        self.runs[id(spec)] = run
        progress = self.progress
        progress.reused += outcome is None
        progress.continued += outcome is not None and outcome.status == "completed" and spec.state == "resume" \
            and outcome.attempts == 1
        progress.failed += run["status"] == "failed"
        progress.finish(spec.steps, None if outcome is None else outcome.seconds or 0.0)
        if run["status"] == "failed":
            how = f"FAILED after {outcome.attempts} attempt(s): {outcome.error}"
        else:
            verdict = verdict_word(run, verdict_metric())
            when = ("reused" if outcome is None else "continued" if spec.state == "resume" and outcome.attempts == 1
                    else f"{run['seconds']:.1f}s")
            how = f"{verdict} ({when}{', attempt 2' if outcome is not None and outcome.attempts > 1 else ''})"
        self.echo(f"{spec.entry.label} [{progress.done}/{progress.total_runs}] {spec.prompt!r} seed {spec.seed}: {how}")


def collect_run(spec, outcome: Outcome | None, scorer=None) -> dict[str, Any]:
    """One run as compare.json records it (``outcome`` None: reused)."""
    from sdsctl.engine.runread import RunData

    base = {"prompt": spec.prompt, "seed": spec.seed, "run_dir": str(spec.path), "reused": outcome is None,
            "attempts": outcome.attempts if outcome else 0}
    if outcome is not None and outcome.status != "completed":
        return {**base, "seconds": round(outcome.seconds or 0.0, 3), "metrics": {}, "figures": {},
                "status": "failed", "error": outcome.error}
    data = RunData.read(spec.path)
    metrics = dict(data.summary.get("metrics", {}))
    if scorer is not None:
        metrics["clip"] = {"score": scorer.score(spec.path / "final.png", spec.prompt)}
    scene = {k: data.summary[k] for k in ("views", "view_metrics") if k in data.summary}  # a 3D run's readings
    return {**base, "seconds": data.summary["seconds"], "metrics": metrics, "figures": data.figures(),
            "status": "completed", **scene}


def check_folder(folder: Path, option: str = "--out") -> None:
    """Refuse an output folder that holds something other than a comparison (nothing is written)."""
    if folder.is_file() or (folder.is_dir() and any(folder.iterdir())
                            and not ((folder / "compare.json").exists() or (folder / "runs").is_dir())):
        raise SdsctlError(f"{option} {folder} is not empty and holds no comparison; choose another folder")


def compare(recipes: list[str], pairs: list[tuple[str, int]], out: Path, sets: list[str] = (),
            overrides: dict[str, Any] | None = None, echo=print, live: bool = False,
            clip: Path | None = None, executor=None) -> dict[str, dict[str, Any]]:
    """Run every recipe on every pair (reusing finished runs); returns ``{label: {"summary": ..., "runs": [...]}}``.

    Raises :class:`CompareInterrupted` when the runs were interrupted (their state is saved:
    the same call continues them)."""
    settings = [Setting(ref, list(sets)) for ref in recipes]
    return run_settings(settings, pairs, out, overrides, echo=echo, live=live, clip=clip, executor=executor)


def run_settings(settings: list[Setting], pairs: list[tuple[str, int]], out: Path,
                 overrides: dict[str, Any] | None = None, *, echo=print, live: bool = False,
                 clip: Path | None = None, executor=None, kind: str = "compare",
                 rank_by: str | None = None, warn=None) -> dict[str, dict[str, Any]]:
    """Plan, execute, collect and write (the module docstring) the settings × ``pairs``.

    ``kind``: ``compare`` or ``sweep`` (names the rows and the report); a sweep ranks its
    settings (``rank_by``, see ``sdsctl.experiments.ranking``). Failed runs are in the results, with
    their error (``summary.failed`` counts them). ``warn``: where the recipes' warnings go
    (default ``echo``)."""
    from sdsctl.experiments.ranking import check_rank_by, parse_rank_by

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    by = parse_rank_by(rank_by, clip is not None) if kind == "sweep" or rank_by else None
    if by is not None:
        check_rank_by(by, clip is not None)
    # validate everything before the first run: a typo in the last setting must not cost the others
    items = entries(settings, overrides, out)
    for e in items:  # the pairs' prompts replace the recipe's: its prompt's warnings are unknown_words' below
        for note in dict.fromkeys(w for w in e.loaded.warnings if not w.startswith("prompt:")):
            (warn or echo)(f"warning: {e.label}: {note}")
    scorer = None
    if clip is not None:
        from sdsctl.experiments.clipscore import ClipScorer

        scorer = ClipScorer(clip)  # a bad folder fails now, before any run
    unknown = unknown_words(items, pairs)
    for prompt, words in unknown.items():
        echo(f"warning: {prompt!r}: no whole-word token for {', '.join(words)} in the model's vocabulary; "
             "the prior has never seen these words (the shapes judge reports n/a for prompts outside its world)")
    specs = plan(items, pairs, overrides)
    executor = executor or LocalExecutor()
    progress = Progress(len(specs), sum(s.steps for s in specs), kind)
    sequential = isinstance(executor, LocalExecutor) and executor.jobs == 1
    driver = _Driver(progress, echo, live, scorer, sequential)
    for spec in specs:
        if spec.state == "reuse":
            driver.finished(spec, None)
    todo = [s for s in specs if s.state != "reuse"]
    if todo:  # all reused: no executor to start (a Ray instance takes seconds)
        if not sequential:
            echo(f"{kind}: {len(todo)} run(s) to execute on {executor.describe()}")
        executor.run(todo, driver)
    ran = len(specs) - progress.reused - progress.continued
    echo(f"reused {progress.reused} of {len(specs)} runs, continued {progress.continued} interrupted, "
         f"ran {ran}" + (f", {progress.failed} failed" if progress.failed else "") + f"; {executor.describe()}")
    results = collect(items, specs, driver.runs)
    write(out, results, pairs, by=by, kind=kind, clip=scorer is not None, unknown=unknown)
    return results


def command(settings: list[Setting], pairs: list[tuple[str, int]], folder: Path, overrides: dict[str, Any], *,
            echo, err, live: bool, clip: Path | None, executor, kind: str = "compare",
            rank_by: str | None = None) -> int:
    """What ``compare`` and ``sweep`` do once their options are read; returns the exit code:
    0, 1 when a run failed (after every output is written), 130 when interrupted."""
    try:
        results = run_settings(settings, pairs, folder, overrides, echo=echo, live=live, clip=clip,
                               executor=executor, kind=kind, rank_by=rank_by, warn=err)
    except (Interrupted, KeyboardInterrupt) as exc:
        err(f"{exc or 'interrupted'}; run the same command again to continue (finished runs are reused)")
        return 130
    echo((folder / "compare.md").read_text(), nl=False)
    echo(f"-> {folder / 'report.html'}")
    failed = sum(res["summary"]["failed"] for res in results.values())
    if failed:
        err(f"error: {failed} run(s) failed twice; their errors are in the table above and in "
            f"{folder / 'compare.json'}; the same command again retries them and reuses the rest")
        return 1
    return 0


def collect(items, specs, runs: dict[int, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per setting (in order): its summary, its runs (in plan order) and what defines it."""
    results: dict[str, dict[str, Any]] = {}
    for e in items:
        these = [runs[id(s)] for s in specs if s.entry is e]
        res = {"summary": summarize(these), "runs": these, "recipe": e.ref, "key": e.key, "folder": str(e.folder),
               "resolved": e.loaded.recipe.model_dump(mode="json")}
        if e.values:
            res["grid"] = e.values
        results[e.label] = res
    return results


def write(out: Path, results: dict[str, dict[str, Any]], pairs: list[tuple[str, int]], *, by=None,
          kind: str = "compare", clip: bool = False, unknown: dict[str, list[str]] | None = None) -> None:
    """compare.json, compare.md, grid.png and report.html into ``out`` (``by``: rank the settings)."""
    from sdsctl.experiments.ranking import rank, ranked_table
    from sdsctl.experiments.report import write_report

    notes = [] if clip else ["CLIP score skipped: no --clip DIR given."]
    if not clip:
        for res in results.values():
            res["summary"]["notes"] = ["CLIP score skipped: no --clip DIR given"]
    rows = rank(results, by) if by is not None else None
    for row in rows or []:
        results[row.label]["summary"]["rank"] = row.as_json(by)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "compare.json", results)
    name = "setting" if kind == "sweep" else "recipe"
    ranked = ranked_table(rows, by) + "\n" if rows is not None else ""
    atomic_write_text(out / "compare.md", ranked + table(results, name) + "\n" + metrics_table(results))
    columns = [f"{p}\nseed {s}" for p, s in pairs]
    _grid({label: [Path(r["run_dir"]) / "final.png" if r.get("status", "completed") == "completed" else None
                   for r in res["runs"]] for label, res in results.items()}, columns, out / "grid.png")
    write_report(out, results, pairs, notes=notes, unknown=unknown, ranking=(rows, by) if rows is not None else None,
                 kind=kind)


def _font(size: int):
    from sdsctl.engine.images import font

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


def _grid(images: dict[str, list[Path | None]], columns: list[str], path: Path, size: int = 96, gap: int = 4) -> None:
    """The final images, one row per setting (labelled on the left), one column per pair (prompt,
    seed above); a failed run's cell is grey and says so."""
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
            x = label_w + c * (size + gap)
            if p is None:
                draw.rectangle((x, y, x + size - 1, y + size - 1), fill="#dddddd")
                draw.text((x + 8, y + size // 2 - 7), "failed", fill="#b42318", font=font)
                continue
            with Image.open(p) as im:
                sheet.paste(im.convert("RGB").resize((size, size), Image.Resampling.NEAREST), (x, y))
    save_image(sheet, path)
