"""`sdsctl compare`: every recipe on the same (prompt, seed) pairs, summarized and judged."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from sdsctl.compare import shapes_pairs, summarize, table


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


def test_shapes_pairs_are_fixed_and_distinct():
    pairs = shapes_pairs(8)
    assert pairs == shapes_pairs(8) and [s for _, s in pairs] == list(range(8))
    assert len({p for p, _ in pairs}) == 8


def test_compare_writes_table_json_and_grid(cli, recipe_file, tmp_path):
    a, b = recipe_file(name="first.yaml"), recipe_file({"guidance": {"name": "sds", "guidance_scale": 20}}, name="second.yaml")
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
        assert grid.size[1] == 2 * 66  # one row per recipe


def test_compare_refuses_a_folder_that_holds_a_comparison(cli, recipe_file, tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "compare.json").write_text("{}")
    result = cli("compare", recipe_file(), "--pairs", "1", "--out", out)
    assert result.exit_code == 2
    assert "already holds a comparison" in result.output and "Traceback" not in result.output
    assert (out / "compare.json").read_text() == "{}"


def test_compare_needs_a_positive_number_of_pairs(cli, recipe_file, tmp_path):
    result = cli("compare", recipe_file(), "--pairs", "0", "--out", tmp_path / "cmp")
    assert result.exit_code == 2 and "--pairs 0" in result.output
    assert not (tmp_path / "cmp").exists()


def test_progress_line_above_the_live_panel():
    import io

    from rich.console import Console

    from sdsctl.compare import Progress, _live_reporter
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
