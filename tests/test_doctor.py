"""`sdsctl doctor` on real runs of the shipped shapes prior: the study's checklist with evidence.

Three runs (about 15 s each on one thread), shared by the tests of this module: the study's
failure modes -- plain SDS at CFG 100 over-saturates, SDS at CFG 7.5 over-smooths -- and its
robust NFSD cuisine, which is healthy.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from typer.testing import CliRunner

    from sdsctl.cli import create_app

    base = tmp_path_factory.mktemp("doctor")
    made = {}
    for name, args in {
        "sds": ["recipes/sds.yaml"],
        "sds-cfg7.5": ["recipes/sds.yaml", "--set", "guidance.guidance_scale=7.5"],
        "robust-nfsd": ["recipes/robust_nfsd.yaml"],
    }.items():
        out = base / name
        result = CliRunner().invoke(create_app(), ["run", str(ROOT / args[0]), *args[1:], "--device", "cpu",
                                                   "--no-live", "--out", str(out)])
        assert result.exit_code == 0, result.output
        made[name] = out
    return made


def _doctor(cli, path: Path) -> dict:
    result = cli("doctor", path, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _problems(report: dict) -> list[str]:
    return [f["check"] for f in report["findings"] if f["ok"] is False]


def test_plain_sds_is_over_saturated_and_the_knob_is_named(cli, runs):
    report = _doctor(cli, runs["sds"])
    assert _problems(report) == ["saturation"] and not report["healthy"]
    (sat,) = [f for f in report["findings"] if f["check"] == "saturation"]
    assert "% of pixels" in sat["evidence"] and "guidance.guidance_scale (now 100" in sat["knob"]


def test_sds_at_cfg_7_5_is_over_smooth(cli, runs):
    report = _doctor(cli, runs["sds-cfg7.5"])
    assert _problems(report) == ["smoothness"]
    (smooth,) = [f for f in report["findings"] if f["check"] == "smoothness"]
    assert "edge sharpness" in smooth["evidence"] and "guidance_scale (now 7.5" in smooth["knob"]


def test_robust_nfsd_is_healthy_and_its_warmup_built_a_structure(cli, runs):
    report = _doctor(cli, runs["robust-nfsd"])
    assert report["healthy"] and _problems(report) == []
    (warm,) = [f for f in report["findings"] if f["check"] == "warmup"]
    assert warm["ok"] and "step 300" in warm["evidence"] and "red circle" in warm["evidence"]
    text = cli("doctor", runs["robust-nfsd"]).output
    assert "verdict: healthy" in text and "converged" in text


def test_an_interrupted_run_is_read_and_resume_is_named(cli, recipe_file, tmp_path):
    run = tmp_path / "run"
    assert cli("run", recipe_file({"steps": 10}), "--out", run, "--no-live").exit_code == 0
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    lines = (run / "metrics.jsonl").read_text().splitlines()[:6]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    report = _doctor(cli, run)
    (status,) = [f for f in report["findings"] if f["check"] == "status"]
    assert "step 6 of 10" in status["title"] and f"sdsctl resume {run}" in status["knob"]


def test_doctor_on_a_folder_that_is_no_run(cli, tmp_path):
    result = cli("doctor", tmp_path)
    assert result.exit_code == 2 and "is not a run directory" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("scale, raise_it", [(7.5, True), (100.0, False)])
def test_over_smooth_advice_raises_the_guidance_scale_only_where_it_is_low(scale, raise_it):
    """At DreamFusion's CFG 100 a higher scale over-saturates: the advice is a guidance
    without the smoothing term instead."""
    from sdsctl.diagnostics.doctor import _knobs

    advice = _knobs({"guidance": {"name": "sds", "guidance_scale": scale}})["less_correction"]
    assert ("a higher guidance.guidance_scale" in advice) is raise_it
    assert "robust-nfsd" in advice


@pytest.fixture(scope="module")
def in_warmup(tmp_path_factory):
    """robust NFSD stopped by its length inside its 300-step warm-up (docs/compare.md's old example)."""
    from typer.testing import CliRunner

    from sdsctl.cli import create_app

    out = tmp_path_factory.mktemp("doctor-warmup") / "run"
    result = CliRunner().invoke(create_app(), ["run", str(ROOT / "recipes/robust_nfsd.yaml"), "--steps", "150",
                                               "--device", "cpu", "--no-live", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_a_run_that_never_left_its_warmup_is_told_to_take_more_steps(cli, in_warmup):
    report = _doctor(cli, in_warmup)
    (phase,) = [f for f in report["findings"] if f["check"] == "phase"]
    assert phase["ok"] is False and "never left its warm-up" in phase["title"]
    assert "--set steps=N with N above 300" in phase["knob"]
    knobs = " ".join(f["knob"] for f in report["findings"])
    assert "guidance.ratio" not in knobs  # the robust phase never ran: its weight did nothing
    assert not ("more warm-up steps" in knobs and "fewer warm-up steps" in knobs)
    assert "fewer warm-up steps" not in knobs


def test_a_check_that_was_not_judged_says_n_a(cli, runs):
    report = _doctor(cli, runs["sds"])  # over-saturated: its smoothness is not judged
    (smooth,) = [f for f in report["findings"] if f["check"] == "smoothness"]
    assert smooth["ok"] is None and "not judged" in smooth["evidence"]
    line = [x for x in cli("doctor", runs["sds"]).output.splitlines() if "smoothness" in x]
    assert line and line[0].lstrip().startswith("n/a"), line


def test_a_failed_run_is_not_sent_to_resume_unless_resume_can_change_it(cli, tmp_path):
    import shutil

    from sdsctl.diagnostics.doctor import diagnose

    for error, expected, refused in (
            ("non-finite value at step 7: score is nan (...)", "change it in a new run", True),
            ("CUDA out of memory at step 3 on cuda:0. To use less memory: ...", "--set dtype=bfloat16", False)):
        run = tmp_path / ("oom" if refused is False else "nan")
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir()
        (run / "recipe.yaml").write_text("steps: 10\nguidance: {name: sds}\n")
        (run / "summary.json").write_text(json.dumps({"status": "failed", "steps_done": 6, "steps": 10,
                                                      "error": error}))
        (run / "metrics.jsonl").write_text("")
        (status,) = [f for f in diagnose(run)["findings"] if f["check"] == "status"]
        assert expected in status["knob"]
        assert ("would fail again" in status["knob"]) == refused
