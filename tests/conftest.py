"""Shared fixtures: a tiny randomly initialized prior, recipe files, the CLI runner.

The tiny prior has the real shapes prior's geometry (64x64 images, 4x8x8 latents, VAE factor
8, the shapes tokenizer, SD's noise schedule) with a few thousand parameters, so a step
takes milliseconds on one CPU thread. It is built from arguments, never downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from sdsctl import plugins
from sdsctl.cli import create_app

# One thread everywhere (tests and the subprocesses they start): the machine is small, and
# CPU results are compared bit for bit across processes.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def build_tiny_prior(out: Path, *, prediction_type: str = "epsilon") -> Path:
    from transformers.utils import logging as tlog

    from sdsctl.shapes.tokenizer import write_tokenizer_files
    from sdsctl.shapes.train import (
        TrainConfig,
        build_text_encoder,
        build_unet,
        build_vae,
        load_tokenizer,
        save_pipeline_folder,
    )

    tlog.disable_progress_bar()
    torch.manual_seed(0)
    cfg = TrainConfig(vae_channels=(16, 16, 16, 16), unet_channels=(16, 32), text_width=32, text_layers=1)
    tok_dir = out.parent / f"{out.name}-tokenizer"
    write_tokenizer_files(tok_dir)
    tok = load_tokenizer(tok_dir)
    save_pipeline_folder(
        out, vae=build_vae(cfg), unet=build_unet(cfg),
        text_encoder=build_text_encoder(cfg, len(tok), tok.bos_token_id, tok.eos_token_id),
        tokenizer_dir=tok_dir,
    )
    if prediction_type != "epsilon":
        import json

        path = out / "scheduler" / "scheduler_config.json"
        config = json.loads(path.read_text())
        config["prediction_type"] = prediction_type
        path.write_text(json.dumps(config))
    return out


@pytest.fixture(scope="session")
def tiny_prior(tmp_path_factory) -> Path:
    """A diffusers SD folder with a tiny random UNet, VAE and text encoder."""
    return build_tiny_prior(tmp_path_factory.mktemp("prior") / "tiny")


@pytest.fixture(scope="session")
def tiny_v_prior(tmp_path_factory) -> Path:
    """The tiny prior with a v-prediction scheduler configuration."""
    return build_tiny_prior(tmp_path_factory.mktemp("prior") / "tiny-v", prediction_type="v_prediction")


@pytest.fixture(scope="session", autouse=True)
def _plugins_loaded():
    plugins.load_plugins()


@pytest.fixture(autouse=True)
def _signal_handlers_left_as_found(request):
    """Every test leaves SIGINT's and SIGTERM's handlers as it found them: one left changed makes
    the Ctrl-C tests that follow it (and the processes they start, which inherit an ignored
    SIGINT) deaf to Ctrl-C."""
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    changed = [signal.Signals(sig).name for sig, handler in before.items() if signal.getsignal(sig) is not handler]
    for sig, handler in before.items():
        signal.signal(sig, handler)
    assert not changed, f"{request.node.nodeid} left the {', '.join(changed)} handler changed"


@pytest.fixture
def recipe_file(tmp_path, tiny_prior):
    """Write a recipe (a dict, merged over a small valid one, or raw YAML text) and return its path."""

    def write(content: dict | str | None = None, name: str = "recipe.yaml", base: bool = True) -> Path:
        path = tmp_path / name
        if isinstance(content, str):
            path.write_text(content)
            return path
        data = {
            "model": str(tiny_prior),
            "prompt": "a red circle on a blue background",
            "steps": 6,
            "output": {"preview_every": 2},
            "device": "cpu",
        } if base else {}
        data.update(content or {})
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


@pytest.fixture
def cli():
    """Invoke the CLI in-process: ``cli("run", str(path), "--no-live")`` -> click Result."""
    runner = CliRunner()

    def invoke(*args: str, **kwargs):
        return runner.invoke(create_app(), [str(a) for a in args], **kwargs)

    return invoke


@pytest.fixture
def register_plugin():
    """``register_plugin(obj, name)`` registers a test plugin; all are unregistered afterwards."""
    names: list[str] = []
    plugins._reported.clear()  # a clash is reported once per process; each test is its own "process"

    def register(plugin: object, name: str) -> object:
        plugins.pm.register(plugin, name=name)
        names.append(name)
        return plugin

    try:
        yield register
    finally:
        for name in names:
            plugins.pm.unregister(name=name)


@pytest.fixture(scope="session")
def tiny_families(tmp_path_factory) -> dict[str, Path]:
    """Tiny random-weight pipeline folders of every family: ``sd1``, ``sd2`` (v-prediction),
    ``sdxl`` and ``if`` (``tests/tiny_pipelines.py``)."""
    import tiny_pipelines

    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the network
    return tiny_pipelines.build_all(tmp_path_factory.mktemp("families"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for the whole test session (starting one takes seconds): two CPUs,
    no dashboard. Executors find it initialized and use it; it stops when the session ends."""
    import logging

    ray = pytest.importorskip("ray", reason='Ray is not installed: pip install "sdsctl[ray]"')
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()


def run_interrupted_after(path: Path, out: Path, steps_done: int, monkeypatch):
    """Run the recipe at ``path`` into ``out`` in this process with a SIGINT sent right after step
    ``steps_done`` (the run handles it: it finishes that step and saves); returns the RunResult."""
    import signal

    from sdsctl.engine.loop import Optimization
    from sdsctl.engine.panel import PlainLog
    from sdsctl.engine.recipe import load_recipe
    from sdsctl.engine.run import execute

    original = Optimization.step

    def interrupting(self, k):
        record = original(self, k)
        if k == steps_done - 1:
            os.kill(os.getpid(), signal.SIGINT)
        return record

    monkeypatch.setattr(Optimization, "step", interrupting)
    try:
        return execute(load_recipe(path), out, PlainLog(100))
    finally:
        monkeypatch.undo()
