"""SIGINT halfway through a real run in a subprocess, then resume: the same image, byte for byte."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

STEPS = 200  # a step takes milliseconds: the run is far from done when the signal lands


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_halfway_then_resume_is_identical(sig, cli, recipe_file, tmp_path):
    recipe = recipe_file({"steps": STEPS, "output": {"preview_every": 20, "checkpoint_every": 1000}})
    part = tmp_path / "part"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from sdsctl.cli import main; main()", "run", str(recipe), "--out", str(part), "--no-live"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        for line in proc.stdout:  # wait for the run to report step 20: it is running, not loading
            if line.startswith("step 20/"):
                break
        else:
            pytest.fail(f"the run ended early: {proc.stderr.read()}")
        proc.send_signal(sig)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert f"{signal.Signals(sig).name} received" in rest and "sdsctl resume" in err
    summary = json.loads((part / "summary.json").read_text())
    done = summary["steps_done"]
    assert summary["status"] == "interrupted" and 20 <= done < STEPS
    state = torch.load(part / "state.pt", weights_only=True)
    assert state["step"] == done
    assert (part / "final.png").is_file()

    result = cli("resume", part, "--no-live")
    assert result.exit_code == 0, result.output
    assert f"from step {done}" in result.stdout

    full = tmp_path / "full"
    assert cli("run", recipe, "--out", full, "--no-live").exit_code == 0
    assert (part / "final.png").read_bytes() == (full / "final.png").read_bytes()
    assert json.loads((part / "summary.json").read_text())["status"] == "completed"
    assert len((part / "metrics.jsonl").read_text().splitlines()) == STEPS
