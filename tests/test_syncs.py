"""No host synchronisation on quiet steps (issue 26): a step's numbers stay on the device until
a logging step fetches them all at once (``sdsctl.engine.records``).

On the CPU nothing waits, so the test counts the calls that *would* wait on a GPU: reading a
tensor's value on the host (``item``, ``tolist``, ``float``/``int``/``bool`` of a tensor) --
except the reads of tensors that live on the host by design on every device: the host
generator's draws (``RunContext.randint``, ``RunContext.rand``), the weightings' ᾱ table (``Weighting``) and
torch.optim's step counters.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch

from sdsctl.engine import records
from sdsctl.engine.loop import Optimization
from sdsctl.engine.recipe import load_recipe
from sdsctl.prior import Prior

READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture(scope="module")
def prior(tiny_prior):
    return Prior.load(str(tiny_prior), torch.device("cpu"), torch.float32)


def _host_side(frame) -> bool:
    """Whether a read comes from a tensor that is on the host whatever the run's device."""
    code = frame.f_code
    if code.co_name in ("randint", "rand") and code.co_filename.endswith("sdsctl/components.py"):
        return True  # the host generator
    if "torch/optim/" in code.co_filename:
        return True  # optimizers keep their step counters on the CPU
    owner = frame.f_locals.get("self")
    from sdsctl.components import Weighting

    return isinstance(owner, Weighting)  # the ᾱ table, kept on the CPU


@pytest.fixture
def host_reads(monkeypatch):
    """Counts host reads of tensor values while ``counting`` is on."""
    seen: list[str] = []
    state = {"on": False}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _name=name, _original=original, **kwargs):
            if state["on"] and not _host_side(sys._getframe(1)):
                seen.append(f"{_name} in {sys._getframe(1).f_code.co_filename}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)

    class Counter:
        reads = seen

        def __enter__(self):
            state["on"] = True
            return self

        def __exit__(self, *exc):
            state["on"] = False

    return Counter


@pytest.mark.parametrize("content", [
    {"guidance": "sds"},
    {"guidance": {"name": "nfsd", "threshold": 500}, "negative_prompt": "dull",
     "schedule": {"name": "uniform", "t_min": 300, "t_max": 700}},
    {"guidance": "robust-nfsd", "negative_prompt": "dull", "schedule": {"name": "warmup", "warmup_steps": 2}},
    {"guidance": {"name": "vsd", "lora_rank": 2}},
    {"guidance": "sds", "parameterization": {"name": "latent-hashgrid", "init_steps": 2}},
    {"guidance": "sds", "parameterization": {"name": "rgb-hashgrid", "init_steps": 2},
     "optimizer": {"fit_space": "both"}},
    {"guidance": "ism"}, {"guidance": "csd"}, {"guidance": "sdi"}, {"guidance": "asd"},
    {"guidance": "sds-bridge", "schedule": {"name": "warmup", "warmup_steps": 2}},
], ids=["sds", "nfsd", "robust-nfsd", "vsd", "ehl", "ehc-hifa", "ism", "csd", "sdi", "asd", "sds-bridge"])
def test_quiet_steps_read_nothing_back_from_the_device(recipe_file, prior, host_reads, content):
    opt = Optimization(load_recipe(recipe_file(content)), prior, torch.device("cpu"), torch.float32)
    opt.initialize()
    pending = records.PendingRecords()
    with host_reads() as counter:
        for k in range(4):
            pending.add(opt.step(k))
    assert counter.reads == []
    fetched = pending.flush()  # the logging step: one read for all four steps
    assert [r["step"] for r in fetched] == [1, 2, 3, 4]
    opt.close()


def test_a_run_fetches_once_per_logging_step(recipe_file, tmp_path, monkeypatch, cli):
    calls = []
    original = records.fetch

    def counting(values):
        calls.append(values.numel())
        return original(values)

    monkeypatch.setattr(records, "fetch", counting)
    out = tmp_path / "run"
    path = recipe_file({"steps": 20, "output": {"preview_every": 10, "log_every": 5, "checkpoint_every": 50}})
    assert cli("run", path, "--out", out, "--no-live").exit_code == 0
    assert len(calls) == 4  # steps 5, 10, 15, 20
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 21))


def test_a_non_finite_value_between_logging_steps_restores_the_last_checked_step(cli, recipe_file, tmp_path,
                                                                                    register_plugin):
    import sdsctl
    from sdsctl_plugins.sds import SDS

    class NaNAtStep7(SDS):
        calls = 0

        def score(self, z, times):
            out = super().score(z, times)
            NaNAtStep7.calls += 1
            if NaNAtStep7.calls == 7:
                out.score = out.score * float("nan")
            return out

    class Plugin:
        @sdsctl.hookimpl
        def register_guidances(self, register):
            register("nan-at-7", NaNAtStep7)

    register_plugin(Plugin(), "test-nan-at-7")
    out = tmp_path / "run"
    path = recipe_file({"steps": 12, "guidance": "nan-at-7",
                        "output": {"preview_every": 5, "log_every": 5, "checkpoint_every": 50}})
    result = cli("run", path, "--out", out, "--no-live")
    assert result.exit_code == 1 and "non-finite value at step 7" in result.stderr
    assert "step 5" in result.stderr  # the last checked step, whose state is kept
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 5 and torch.isfinite(state["param"]["latents"]).all()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["steps_done"], summary["failed_step"]) == (5, 7)
