"""Run loggers: TensorBoard and W&B (offline) read back with their own readers, a plugin's
logger, a missing library, an unknown name, a logger that fails."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

import sdsctl
from sdsctl.components import ComponentConfig, Logger


def _run(cli, recipe_file, tmp_path, *log, steps=4):
    out = tmp_path / "run"
    args = []
    for name in log:
        args += ["--log", name]
    result = cli("run", recipe_file({"steps": steps}), "--out", out, "--no-live", *args)
    return result, out


def test_tensorboard_event_files_parse_with_tensorboards_reader(cli, recipe_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator as ea

    result, out = _run(cli, recipe_file, tmp_path, "tensorboard")
    assert result.exit_code == 0, result.output
    acc = ea.EventAccumulator(str(out / "tensorboard"), size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
    acc.Reload()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    loss = acc.Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in records], rel=1e-5)
    assert {"norms/score", "timesteps/t", "weight", "lr"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Images("preview")] == [2, 4]  # output.preview_every: 2
    summary = json.loads((out / "summary.json").read_text())
    assert acc.Scalars("summary/steps_done")[0].value == summary["steps_done"] == 4


def _wandb_records(path: Path):
    """The protobuf records of an offline W&B run file (a LevelDB-style log: 7-byte file header,
    32 KiB blocks, each chunk with a 7-byte header of CRC, length and type)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the rest of a block is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record
        if length == 0 and kind == 0:
            break


def test_wandb_offline_run_holds_the_steps_and_the_summary(cli, recipe_file, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    result, out = _run(cli, recipe_file, tmp_path, "wandb")
    assert result.exit_code == 0, result.output
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history, summary, kinds = {}, {}, []
    for record in _wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        kinds.append(kind)
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(items["_step"], {}).update(items)
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(history) == [1, 2, 3, 4], (kinds, run_file.stat().st_size)
    assert [history[s]["loss"] for s in (1, 2, 3, 4)] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    previews = [history[s].get("preview/path", "") for s in (1, 2, 3, 4)]
    assert [bool(p) for p in previews] == [False, True, False, True]
    assert all((run_file.parent / "files" / p).is_file() for p in previews if p)
    assert summary["status"] == "completed" and summary["steps_done"] == 4


def test_a_missing_library_skips_the_logger_with_a_clear_message(cli, recipe_file, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    result, out = _run(cli, recipe_file, tmp_path, "tensorboard", steps=2)
    assert result.exit_code == 0, result.output
    assert ('warning: --log tensorboard: skipped, the tensorboard package is not installed '
            '(pip install "sdsctl[tensorboard]")') in result.stderr
    assert not (out / "tensorboard").exists() and (out / "final.png").is_file()


def test_an_unknown_logger_is_an_input_error(cli, recipe_file, tmp_path):
    result, out = _run(cli, recipe_file, tmp_path, "tensorbored", steps=2)
    assert result.exit_code == 2
    assert "--log tensorbored: no such logger; installed loggers: tensorboard, wandb" in result.stderr
    assert not out.exists()


class Recording(Logger):
    """A test logger that records what it is given."""

    calls: list = []

    class Config(ComponentConfig):
        name: str = "test-recording"

    def start(self, info):
        self.calls.append(("start", info["steps"], self.run_dir.is_dir()))

    def step(self, record):
        self.calls.append(("step", record["step"]))

    def preview(self, step, image):
        self.calls.append(("preview", step, tuple(image.shape)))

    def summary(self, summary):
        self.calls.append(("summary", summary["status"]))

    def close(self):
        self.calls.append(("close",))


class Failing(Recording):
    class Config(ComponentConfig):
        name: str = "test-failing"

    def step(self, record):
        raise RuntimeError("disk full")


class LoggerPlugin:
    @sdsctl.hookimpl
    def register_loggers(self, register):
        register("test-recording", Recording)
        register("test-failing", Failing)


def test_a_plugins_logger_sees_steps_previews_and_the_summary(register_plugin, cli, recipe_file, tmp_path):
    register_plugin(LoggerPlugin(), "test-loggers")
    Recording.calls = []
    result, _ = _run(cli, recipe_file, tmp_path, "test-recording")
    assert result.exit_code == 0, result.output
    assert Recording.calls == [("start", 4, True), ("step", 1), ("step", 2), ("preview", 2, (3, 64, 64)), ("step", 3),
                               ("step", 4), ("preview", 4, (3, 64, 64)), ("summary", "completed"), ("close",)]


def test_a_failing_logger_is_switched_off_and_the_run_goes_on(register_plugin, cli, recipe_file, tmp_path):
    register_plugin(LoggerPlugin(), "test-loggers")
    Recording.calls = []
    result, out = _run(cli, recipe_file, tmp_path, "test-failing", "test-recording")
    assert result.exit_code == 0, result.output
    assert "logger 'test-failing' failed in step and is switched off: RuntimeError: disk full" in result.output
    assert ("summary", "completed") in Recording.calls  # the other logger carried on
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
