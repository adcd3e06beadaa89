"""Signals and a second writer, against real subprocesses: what the message says is what the
run directory holds, and a live run keeps its directory to itself."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from sdsctl.engine.images import png_bytes, to_pil
from sdsctl.engine.loop import Optimization
from sdsctl.engine.recipe import load_recipe

STEPS = 200  # a step takes milliseconds: the run is far from done when the signal lands
POSIX = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SDSCTL = [sys.executable, "-c", "from sdsctl.cli import main; main()"]


def start_run(recipe, out, *args):
    """``sdsctl run`` in a subprocess, returned once it has reported step 20 (it is running, not loading)."""
    proc = subprocess.Popen([*SDSCTL, "run", str(recipe), "--out", str(out), "--no-live", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    for line in proc.stdout:
        if line.startswith("step 20/"):
            return proc
    proc.wait(timeout=60)
    pytest.fail(f"the run ended early: {proc.stderr.read()}")


def finish(proc, timeout=120):
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()


def image_of_state(run_dir) -> bytes:
    """final.png as it must be for the θ in state.pt: rendered afresh from the saved state."""
    loaded = load_recipe(run_dir / "recipe.yaml")
    prior = loaded.components["model"].obj(loaded.recipe.model).load(torch.device("cpu"), torch.float32)
    opt = Optimization(loaded, prior, torch.device("cpu"), torch.float32)
    opt.load_state(torch.load(run_dir / "state.pt", weights_only=True))
    return png_bytes(to_pil(opt.image()))


@POSIX
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_halfway_then_resume_is_identical(sig, cli, recipe_file, tmp_path):
    recipe = recipe_file({"steps": STEPS, "output": {"preview_every": 20, "checkpoint_every": 1000}})
    part = tmp_path / "part"
    proc = start_run(recipe, part)
    proc.send_signal(sig)
    rest, err = finish(proc)
    assert proc.returncode == 130, err
    assert f"{signal.Signals(sig).name} received" in rest and "sdsctl resume" in err
    assert ("Ctrl-C" in rest) == (sig == signal.SIGINT)  # SIGTERM's message does not talk of Ctrl-C
    summary = json.loads((part / "summary.json").read_text())
    done = summary["steps_done"]
    assert summary["status"] == "interrupted" and 20 <= done < STEPS
    assert f"interrupted at step {done}/{STEPS}" in err
    state = torch.load(part / "state.pt", weights_only=True)
    assert state["step"] == done
    assert (part / "final.png").is_file() and not (part / ".lock").exists()

    result = cli("resume", part, "--no-live")
    assert result.exit_code == 0, result.output
    assert f"from step {done}" in result.stdout

    full = tmp_path / "full"
    assert cli("run", recipe, "--out", full, "--no-live").exit_code == 0
    assert (part / "final.png").read_bytes() == (full / "final.png").read_bytes()
    assert json.loads((part / "summary.json").read_text())["status"] == "completed"
    assert len((part / "metrics.jsonl").read_text().splitlines()) == STEPS


@POSIX
@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGINT), (signal.SIGINT, signal.SIGTERM),
                                           (signal.SIGTERM, signal.SIGTERM)],
                         ids=["INT-INT", "INT-TERM", "TERM-TERM"])
def test_two_signals_in_quick_succession_leave_files_that_match_the_message(first, second, cli, recipe_file, tmp_path):
    recipe = recipe_file({"steps": STEPS, "output": {"preview_every": 20, "checkpoint_every": 1000, "log_every": 5}})
    part = tmp_path / "part"
    proc = start_run(recipe, part)
    proc.send_signal(first)
    proc.send_signal(second)  # whenever it lands: mid-step, while saving, or coalesced with the first
    out, err = finish(proc)
    assert proc.returncode == 130, err
    assert "Traceback" not in err + out
    said = re.search(r"interrupted at step (\d+)/(\d+)", err)
    assert said, err
    step = int(said.group(1))
    assert f"hold step {step}" in err and f"sdsctl resume {part}" in err
    if first == signal.SIGTERM:
        assert "Ctrl-C" not in out + err
    state = torch.load(part / "state.pt", weights_only=True)
    summary = json.loads((part / "summary.json").read_text())
    assert state["step"] == step == summary["steps_done"] and summary["status"] == "interrupted"
    steps = [json.loads(x)["step"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 1))
    assert (part / "progress.png").is_file() and not (part / ".lock").exists()
    assert (part / "final.png").read_bytes() == image_of_state(part)

    result = cli("resume", part, "--no-live")
    assert result.exit_code == 0, result.output
    assert f"from step {step}" in result.stdout
    assert len((part / "metrics.jsonl").read_text().splitlines()) == STEPS


@POSIX
def test_a_second_writer_is_refused_while_the_run_lives_and_a_stale_lock_is_taken_over(recipe_file, tmp_path):
    recipe = recipe_file({"steps": 100_000, "output": {"preview_every": 20, "checkpoint_every": 1000}})
    part = tmp_path / "part"
    proc = start_run(recipe, part)
    try:
        for args in (["resume", str(part), "--no-live"],
                     ["run", str(recipe), "--out", str(part), "--overwrite", "--no-live"]):
            second = subprocess.run([*SDSCTL, *args], capture_output=True, text=True, env=ENV, timeout=120)
            assert second.returncode == 2, second.stderr
            assert f"in use by another sdsctl (pid {proc.pid}, since " in second.stderr
            assert second.stderr.count("error:") == 1 and "Traceback" not in second.stderr
        assert proc.poll() is None  # the first run goes on
        proc.send_signal(signal.SIGTERM)
        _, err = finish(proc)
        assert proc.returncode == 130, err
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (part / ".lock").exists()

    # a run killed outright leaves its lock file behind; the next writer takes it over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (part / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "since": time.time() - 60,
                                            "command": "sdsctl run"}))
    summary = json.loads((part / "summary.json").read_text())
    steps = summary["steps_done"] + 2
    resumed = subprocess.run([*SDSCTL, "resume", str(part), "--no-live", "--set", f"steps={steps}"],
                             capture_output=True, text=True, env=ENV, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert f"took over the lock of {part} from pid {int(dead.stdout)}" in resumed.stdout + resumed.stderr
    assert not (part / ".lock").exists()


@POSIX
def test_a_closed_standard_output_stops_the_run_as_sigterm_does(cli, recipe_file, tmp_path):
    """``sdsctl run ... --no-live | head -3``: the step finishes and is saved, the run is marked
    interrupted (signal SIGPIPE) and resumes; no traceback."""
    recipe = recipe_file({"steps": STEPS, "output": {"preview_every": 20, "checkpoint_every": 1000}})
    out = tmp_path / "run"
    proc = subprocess.Popen([*SDSCTL, "run", str(recipe), "--out", str(out), "--no-live"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    lines = [proc.stdout.readline() for _ in range(3)]
    assert lines[-1].startswith("step ")
    proc.stdout.close()  # as head does after its lines
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130, err
    assert "Traceback" not in err and "SIGPIPE: interrupted at step" in err
    summary = json.loads((out / "summary.json").read_text())
    done = summary["steps_done"]
    assert (summary["status"], summary["signal"]) == ("interrupted", "SIGPIPE") and 0 < done < STEPS
    assert torch.load(out / "state.pt", weights_only=True)["step"] == done and not (out / ".lock").exists()
    result = cli("resume", out, "--no-live", "--steps", str(done + 5))
    assert result.exit_code == 0 and f"from step {done}" in result.stdout
