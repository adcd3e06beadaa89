"""``sdsctl bench``: its report's keys, call counts, the floor's model evaluations, and that its
instrumentation leaves nothing behind. Speeds are reported, never asserted."""

from __future__ import annotations

import json

import pytest
import torch

from sdsctl.diagnostics.bench import PHASES, PhaseTimer, bench
from sdsctl.engine.recipe import load_recipe
from sdsctl.models import Prior

KEYS = {"steps_per_second", "ms_per_step", "unet_calls_per_step", "breakdown_ms", "peak_memory_mb", "device",
        "dtype", "floor_ratio", "floor_ms", "threads"}


@pytest.fixture(scope="module")
def prior(tiny_prior):
    return Prior.load(str(tiny_prior), torch.device("cpu"), torch.float32)


def test_bench_json_has_the_issue_s_keys(cli, recipe_file):
    result = cli("bench", recipe_file(), "--steps", "3", "--warmup", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert KEYS <= set(report)
    assert set(report["breakdown_ms"]) == set(PHASES)
    assert report["unet_calls_per_step"] == 1 and report["floor_ms"] > 0 and report["ms_per_step"] > 0
    assert report["floor_ratio"] == pytest.approx(report["ms_per_step"] / report["floor_ms"], rel=1e-2)
    assert report["device"] == "cpu" and report["dtype"] == "float32"
    assert report["threads"] == torch.get_num_threads()


@pytest.mark.parametrize("content, unet_calls, kinds", [
    ({"guidance": "sds"}, 1, {"unet"}),
    ({"guidance": "robust-nfsd", "negative_prompt": "dull"}, 1, {"unet"}),
    ({"guidance": {"name": "vsd", "lora_rank": 2, "lora_updates": 2}}, 4, {"unet"}),
    ({"parameterization": {"name": "rgb-hashgrid", "init_steps": 2}}, 1, {"unet", "encode"}),
    ({"parameterization": {"name": "rgb-hashgrid", "init_steps": 2}, "optimizer": {"fit_space": "both"}}, 1,
     {"unet", "encode", "decode"}),
], ids=["sds", "robust-nfsd", "vsd", "ehc", "ehc-image-target"])
def test_calls_per_step_and_what_the_floor_replays(recipe_file, prior, monkeypatch, content, unet_calls, kinds):
    from sdsctl.diagnostics import bench as bench_module

    replayed = []
    original = bench_module._floor_ms

    def recording(prior_, calls, device, repeats):
        replayed.append({kind for kind, *_ in calls})
        return original(prior_, calls, device, repeats)

    monkeypatch.setattr(bench_module, "_floor_ms", recording)
    report = bench(load_recipe(recipe_file(content)), steps=2, warmup=0, prior=prior)
    assert report["unet_calls_per_step"] == unet_calls
    assert replayed and all(r == kinds for r in replayed)


def test_bench_leaves_no_wrapper_behind(recipe_file, prior):
    bench(load_recipe(recipe_file({"guidance": "sds"})), steps=2, warmup=0, prior=prior)
    for name in ("predict_noise", "encode_images", "decode_latents"):
        assert name not in vars(prior)  # the class's own methods again
    assert torch.autograd.backward.__module__ == "torch.autograd"


def test_phase_timer_counts_nested_time_once():
    ticks = iter(range(100))

    class FakeClock:
        def mark(self):
            return next(ticks)

        def ms(self, start, end):
            return float(end - start)

    timer = PhaseTimer(FakeClock())
    with timer.phase("guidance"):  # marks 0 .. 5
        with timer.phase("unet"):  # 1 .. 2
            pass
        with timer.phase("unet"):  # 3 .. 4
            pass
    totals = timer.totals()
    assert totals["unet"] == 2.0 and totals["guidance"] == 3.0


def test_bench_bad_steps_is_an_input_error(cli, recipe_file):
    result = cli("bench", recipe_file(), "--steps", "1")
    assert result.exit_code == 2 and "at least 2 timed steps" in result.stderr



def test_ops_per_step_counts_the_step_s_own_operations_apart_from_the_model_s():
    """benchmarks/ops_per_step.py: the load-independent measure of a step's overhead."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / "ops_per_step.py"
    spec = importlib.util.spec_from_file_location("ops_per_step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.count("sds", steps=2, top=50)
    outside = report["most_frequent_outside"]
    assert "aten.randn.generator" in outside  # the guidance's noise is the step's own work
    assert not any("convolution" in op for op in outside)  # the UNet's are not
    assert report["ops_per_step_in_model_calls"] > report["ops_per_step_outside"] > 0


def test_peak_memory_is_the_process_own_not_its_launchers():
    """``peak_memory_mb`` on the CPU: a process started by one that once held far more memory
    reports its own peak. ``ru_maxrss`` carries the launcher's peak across a ``vfork`` + ``exec``
    (Python's ``subprocess``), so every run ``benchmarks/fullsize.py`` started after building a
    15 GB model read 15 GB (issue 42)."""
    import subprocess
    import sys

    ballast = b"\x01" * (1200 * 2**20)  # 1.2 GB, every page touched
    del ballast
    probe = ("import torch; from sdsctl.devices import peak_memory_mb; "
             "print(peak_memory_mb(torch.device('cpu')))")
    child_peak = float(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                                      check=True).stdout.split()[-1])
    assert 50 < child_peak < 1000  # importing torch, not the launcher's 1.2 GB
