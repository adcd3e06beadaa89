"""`sdsctl compare`: every recipe on the same (prompt, seed) pairs, summarized and judged."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sdsctl.experiments.compare import shapes_pairs, summarize, table


def _run(prompt: str, match: bool, iou: float, error: float, seconds: float = 1.0) -> dict:
    judged = {"match": match, "shape_iou": iou, "palette_error": error}
    return {"prompt": prompt, "seed": 0, "seconds": seconds, "metrics": {"shapes-judge": judged}}


def test_summary_reports_matches_shape_iou_and_palette_error():
    runs = [_run("a", True, 0.9, 0.05, 2.0), _run("b", True, 0.5, 0.2, 4.0), _run("c", False, 0.7, 0.1, 3.0)]
    s = summarize(runs)
    assert (s["runs"], s["matches"]) == (3, 2)
    assert s["match_rate"] == pytest.approx(2 / 3)
    assert s["median_shape_iou"] == pytest.approx(0.7)
    assert s["median_palette_error"] == pytest.approx(0.1)
    assert s["seconds_per_run"] == pytest.approx(3.0)


def test_summary_without_the_judge_says_so_in_the_table():
    runs = [{"prompt": "a cat", "seed": 0, "seconds": 1.0, "metrics": {}}]
    s = summarize(runs)
    assert (s["match_rate"], s["median_shape_iou"], s["median_palette_error"]) == (None, None, None)
    assert "| r | n/a | n/a | n/a | 1.0 |" in table({"r": {"summary": s}})


def test_default_pairs_come_from_the_metric_that_lists_prompts():
    from sdsctl_plugins.shapes_judge import ShapesJudge

    offered = set(ShapesJudge.prompts())
    assert len(offered) > 8 and {p for p, _ in shapes_pairs(8)} <= offered


def test_without_a_metric_that_lists_prompts_compare_asks_for_prompt(cli, tmp_path, monkeypatch):
    from sdsctl_plugins.shapes_judge import ShapesJudge

    monkeypatch.setattr(ShapesJudge, "prompts", classmethod(lambda cls: None))
    result = cli("compare", "sds", "--out", str(tmp_path / "cmp"))
    assert result.exit_code == 2
    assert "--prompt" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "cmp").exists()


def test_shapes_pairs_are_fixed_and_distinct():
    pairs = shapes_pairs(8)
    assert pairs == shapes_pairs(8) and [s for _, s in pairs] == list(range(8))
    assert len({p for p, _ in pairs}) == 8


def test_compare_writes_table_json_and_grid(cli, recipe_file, tmp_path):
    a, b = recipe_file(name="first.yaml"), recipe_file({"guidance": {"name": "sds", "guidance_scale": 20}},
                                                       name="second.yaml")
    out = tmp_path / "cmp"
    result = cli("compare", a, b, "--pairs", "2", "--steps", "2", "--out", out)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "compare.json").read_text())
    assert list(results) == ["first", "second"]
    for res in results.values():
        assert [r["prompt"] for r in res["runs"]] == [p for p, _ in shapes_pairs(2)]
        assert res["summary"]["runs"] == 2 and res["summary"]["median_shape_iou"] is not None
    md = (out / "compare.md").read_text()
    assert "median shape IoU" in md and "| first |" in md and "| second |" in md
    with Image.open(out / "grid.png") as grid:
        assert grid.size[1] > 2 * 100  # a label row, then one 96-px row per recipe
    assert (out / "report.html").is_file()
    # the same comparison again reuses every run and says so
    again = cli("compare", a, b, "--pairs", "2", "--steps", "2", "--out", out)
    assert again.exit_code == 0, again.output
    assert "reused 4 of 4 runs" in again.output and "model loaded 0 time(s)" in again.output
    # one more pair: the first two are reused, two new runs share one loaded model
    more = cli("compare", a, b, "--pairs", "3", "--steps", "2", "--out", out)
    assert "reused 4 of 6 runs" in more.output and "model loaded 1 time(s)" in more.output, more.output


def test_compare_refuses_a_folder_that_holds_something_else(cli, recipe_file, tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = cli("compare", recipe_file(), "--pairs", "1", "--out", out)
    assert result.exit_code == 2
    assert "holds no comparison" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_compare_needs_a_positive_number_of_pairs(cli, recipe_file, tmp_path):
    result = cli("compare", recipe_file(), "--pairs", "0", "--out", tmp_path / "cmp")
    assert result.exit_code == 2 and "--pairs 0" in result.output
    assert not (tmp_path / "cmp").exists()


def test_same_named_recipes_get_two_rows_and_folders(cli, recipe_file, tmp_path):
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a = recipe_file(name="a/x.yaml")
    b = recipe_file({"guidance": {"name": "sds", "guidance_scale": 20}}, name="b/x.yaml")
    out = tmp_path / "cmp"
    result = cli("compare", a, b, "--seeds", "2", "--steps", "2", "--out", out)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "compare.json").read_text())
    assert list(results) == ["a/x", "b/x"]
    assert [r["seed"] for r in results["a/x"]["runs"]] == [0, 1]
    folders = {Path(r["run_dir"]).parent for res in results.values() for r in res["runs"]}
    assert len(folders) == 2 and all(f.name.startswith("x-") for f in folders)
    assert results["b/x"]["resolved"]["guidance"]["guidance_scale"] == 20


def test_an_interrupted_run_is_continued(cli, recipe_file, tmp_path):
    import shutil

    r = recipe_file()
    assert cli("compare", r, "--seeds", "1", "--steps", "2", "--out", tmp_path / "short").exit_code == 0
    out = tmp_path / "cmp"
    assert cli("compare", r, "--seeds", "1", "--steps", "4", "--out", out).exit_code == 0
    (short,
     ) = [Path(x["run_dir"]) for x in json.loads((tmp_path / "short" / "compare.json").read_text())["recipe"]["runs"]]
    (run,) = [Path(x["run_dir"]) for x in json.loads((out / "compare.json").read_text())["recipe"]["runs"]]
    final = (run / "final.png").read_bytes()
    # make the 4-step run one that was interrupted after step 2: its state, metrics and summary
    shutil.copy(short / "state.pt", run / "state.pt")
    lines = (run / "metrics.jsonl").read_text().splitlines()[:2]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted", "steps_done": 2}))
    again = cli("compare", r, "--seeds", "1", "--steps", "4", "--out", out)
    assert "continued 1 interrupted" in again.output, again.output
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 4
    assert (run / "final.png").read_bytes() == final  # as if never interrupted (CPU: bit for bit)


def test_prompts_outside_the_shapes_world_are_judged_na_with_one_warning(cli, recipe_file, tmp_path):
    out = tmp_path / "cmp"
    result = cli("compare", recipe_file(), "--prompt", "a photo of a dog", "--seeds", "2", "--steps", "4", "--out", out)
    assert result.exit_code == 0, result.output
    assert result.output.count("warning:") == 1 and "photo" in result.output and "dog" in result.output
    res = json.loads((out / "compare.json").read_text())["recipe"]
    assert res["summary"]["match_rate"] is None and "| recipe | n/a |" in (out / "compare.md").read_text()
    judged = res["runs"][0]["metrics"]["shapes-judge"]
    assert judged["applies"] is False and "photo" in judged["note"] and "match" not in judged
    assert {"saturation", "sharpness", "colorfulness"} <= set(res["runs"][0]["metrics"]["image-stats"])
    assert res["summary"]["notes"] == ["CLIP score skipped: no --clip DIR given"]
    figures = res["runs"][0]["figures"]
    assert figures["convergence"] is not None and figures["seconds_per_step"] > 0 and figures["peak_memory_mb"] > 0


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialized CLIP, a few thousand parameters, saved as a transformers folder."""
    import shutil

    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from sdsctl.prior import SHAPES_PRIOR

    folder = tmp_path_factory.mktemp("clip")
    vocab = len(json.loads((SHAPES_PRIOR / "tokenizer" / "vocab.json").read_text()))
    config = CLIPConfig(
        text_config={"vocab_size": vocab, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=8)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    for f in (SHAPES_PRIOR / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    return folder


def test_clip_score_with_a_local_clip_folder(cli, recipe_file, tmp_path, tiny_clip):
    out = tmp_path / "cmp"
    result = cli("compare", recipe_file(), "--seeds", "1", "--steps", "2", "--clip", tiny_clip, "--out", out)
    assert result.exit_code == 0, result.output
    res = json.loads((out / "compare.json").read_text())["recipe"]
    score = res["runs"][0]["metrics"]["clip"]["score"]
    assert 0 <= score <= 100 and "clip.score" in res["summary"]["metrics"] and "notes" not in res["summary"]


def test_a_folder_without_clip_is_refused_before_any_run(cli, recipe_file, tmp_path):
    result = cli("compare", recipe_file(), "--seeds", "1", "--clip", tmp_path, "--out", tmp_path / "cmp")
    assert result.exit_code == 2 and "no CLIP model there" in result.output
    assert not (tmp_path / "cmp" / "runs").exists()


def test_progress_line_above_the_live_panel():
    import io

    from rich.console import Console

    from sdsctl.experiments.compare import Progress, _live_reporter
    from sdsctl.shapes.judge import outside_world

    progress = Progress(total_runs=4, total_steps=400)
    progress.reused += 1
    progress.finish(100, None)
    progress.finish(100, 10.0)  # 0.1 s per step executed here: 200 steps left -> 20 s
    progress.current = "sds 'a red circle' seed 1"
    panel = _live_reporter(progress)
    panel.info = {"title": "sds", "steps": 100, "start_step": 0, "device": "cpu", "run_dir": "r"}
    panel.started = 0.0
    console = Console(file=io.StringIO(), width=120)
    console.print(panel.render())
    text = console.file.getvalue()
    assert text.index("compare: 2/4 runs done, 1 reused") < text.index("0/100")
    assert "ETA 0:00:20" in text
    assert outside_world("a red circle on a blue background") is None
    assert "dog" in outside_world("a photo of a dog") and outside_world("a red thing")


# ----------------------------------------------------------------------------- charts


def test_charts_show_coinciding_lines_constant_series_and_log_axes():
    import re

    from sdsctl.experiments.report import svg_plot

    colors = {"a": "#111111", "b": "#222222", "c": "#333333"}
    same = [(0, 1.0), (10, 2.0), (20, 3.0)]
    svg = svg_plot("t", {"a": same, "b": list(same), "c": [(0, 1.0), (10, 2.5), (20, 3.0)]}, colors)
    lines = re.findall(r'<polyline [^>]*stroke="(#\d+)"([^>]*)>', svg)
    assert [(c, "stroke-dasharray" in rest) for c, rest in lines] == [("#111111", False), ("#222222", True),
                                                                       ("#333333", False)]
    assert "b: identical to a (dashed)" in svg and "c: identical" not in svg

    constant = svg_plot("lr", {"a": [(0, 0.01), (10, 0.01)]}, colors)
    y_label = r'<text x="52" y="[0-9.]+" font-size="10" text-anchor="end">([-0-9.e]+)</text>'  # the y axis's
    labels = [float(x) for x in re.findall(y_label, constant)]
    assert len(labels) == 3 and all(0.009 <= v <= 0.011 for v in labels), labels  # around 0.01, not -0.49..0.51

    wide = svg_plot("score", {"a": [(0, 1.0), (10, 1000.0)]}, colors)
    assert wide.count("(log y)") == 2  # the step axis and the y axis
    assert "(log y)" not in svg


def test_the_comparisons_eta_moves_while_a_run_is_going():
    from sdsctl.experiments.compare import Progress

    progress = Progress(total_runs=2, total_steps=200)
    assert progress.eta() == "?"  # nothing measured yet
    progress.running(50, 10.0)  # the first run: 50 steps in 10 s
    first = progress.eta()
    assert first == "0:00:30"  # 150 steps left at 0.2 s each
    progress.running(80, 16.0)
    assert progress.eta() == "0:00:24" != first  # it moves while the run goes on
    progress.finish(100, 20.0)
    assert progress.eta() == "0:00:20"  # 100 steps left at the finished run's rate


def test_run_folders_keep_whole_words_and_earlier_comparisons_are_reused(cli, recipe_file, tmp_path):
    """A run folder's name is the prompt's whole words (not "...-white-backg"); a comparison made
    when names were cut at 32 characters finds its runs again under their old names."""
    import shutil

    from sdsctl.experiments.plan import slug

    assert slug("a purple square on a white background") == "a-purple-square-on-a-white-background"
    assert slug("word " * 20).endswith("word") and len(slug("word " * 20)) <= 48
    path = recipe_file({"steps": 2})
    out = tmp_path / "cmp"
    prompt = "a purple square on a white background"
    assert cli("compare", path, "--prompt", prompt, "--out", out, "--no-live").exit_code == 0
    (run,) = [p for p in (out / "runs").glob("*/*") if p.is_dir()]
    assert "a-purple-square-on-a-white-background" in run.name
    old_name = run.name.replace("a-purple-square-on-a-white-background", "a-purple-square-on-a-white-backg")
    shutil.move(run, run.with_name(old_name))  # as a comparison of the earlier version left it
    again = cli("compare", path, "--prompt", prompt, "--out", out, "--no-live")
    assert again.exit_code == 0 and "reused 1 of 1 runs" in again.output


def test_the_summaries_follow_the_metrics_declarations_not_the_shapes_judges_keys(monkeypatch):
    """compare's counts, medians and table come from the verdict metric's declarations
    (``Metric.verdict``, ``headline``, ``verdict_words``): no core module names a metric's keys."""
    from sdsctl.components import Metric
    from sdsctl.experiments import summaries

    class Aesthetic(Metric):
        verdict = "pleasing"
        verdict_words = {"column": "pleasing", "rate": "the pleasing rate", "yes": "nice", "no": "meh",
                         "none": "unjudged"}
        headline = {"score": ("aesthetic score", ".1f")}

    runs = [{"status": "completed", "seconds": 2.0, "seed": i, "metrics": {"aesthetic": {"pleasing": p, "score": s}}}
            for i, (p, s) in enumerate([(True, 6.0), (False, 4.0), (True, 7.0)])]
    monkeypatch.setattr(summaries, "verdict_metric", lambda: ("aesthetic", Aesthetic))
    summary = summaries.summarize(runs)
    assert (summary["matches"], summary["runs"], summary["median_score"]) == (2, 3, 6.0)
    assert "median_palette_error" not in summary
    table = summaries.table({"mine": {"summary": summary}})
    assert table.splitlines()[0] == "| recipe | pleasing | median aesthetic score | s/run |"
    assert "| mine | 2/3 (67%) | 6.0 | 2.0 |" in table
    assert [summaries.verdict_word(r, summaries.verdict_metric()) for r in runs] == ["nice", "meh", "nice"]
    monkeypatch.setattr(summaries, "verdict_metric", lambda: None)
    assert summaries.table({"mine": {"summary": summaries.summarize(runs)}}).splitlines()[0] == \
        "| recipe | verdict | s/run |"
