"""The default training (`TrainConfig()`, what `sdsctl train-shapes` runs) pinned by hashes.

A few steps of every stage that the defaults run, on small models, hashed stage by stage:
any change to the shipped recipe (a loss term, a batch's composition, a seed, the order of
random draws) changes a hash, so a refactoring of the training code can show that it trains
exactly as before. Only the step counts, batch sizes, world size and model widths are
overridden; every other field keeps its default.

The hashes are of the CPU's results at one thread with deterministic algorithms; another
CPU architecture or PyTorch release may round differently. If a hash changes on purpose
(the recipe changed), say so in CHANGELOG.md and replace it.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from sdsctl.shapes.train import TrainConfig, Trainer

#: stage -> sha256 of the weights it produced (see :func:`_digest`)
EXPECTED = {
    "vae": "3db9910160f95f36de4977ba3b353e159247a61e3600e5070de2b50900913c16",
    "decoder": "85fa4148d54418fa0a14ad28b0672228c2691084b72f6fdef1d10ce10d0c2d39",
    "latents": "876609e78a3d47e983c653ceb598c5ed11217c4879eeed3f65e63a55954b8b95",
    "prior": "b2140342781b270e8f46ea7f632a7de930377ae6c324bab46a44ac225fb63231",
    "exported": "180c81e4b61f1a06ce12e8a8b5faff3f44e188081743326bef78018374b7c3a2",
}


def pinned_config() -> TrainConfig:
    """The defaults, shrunk: every field not named here is ``TrainConfig()``'s."""
    return TrainConfig(vae_steps=3, vae_batch=16, decoder_steps=2, n_images=48, prior_steps=3, prior_batch=8,
                       checkpoint_every=1000, vae_channels=(16, 16, 16, 16), unet_channels=(16, 32), text_width=32,
                       text_layers=1)


def _digest(tensors: dict) -> str:
    """sha256 over the sorted names, dtypes, shapes and bytes of a (nested) dict of tensors."""
    h = hashlib.sha256()

    def feed(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k in sorted(value, key=str):
                feed(f"{prefix}/{k}", value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                feed(f"{prefix}/{i}", v)
        elif isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{prefix}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes())
        else:
            h.update(f"{prefix}={value!r}".encode())

    feed("", tensors)
    return h.hexdigest()


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.set_num_threads(before[1])


def test_the_default_training_is_pinned_stage_by_stage(tmp_path, deterministic):
    from safetensors.torch import load_file

    work = tmp_path / "work"
    ckpt = work / "checkpoint.pt"
    got: dict[str, str] = {}
    seen: list[str] = []

    def on_progress(stage: str, step: int, total: int, logs: dict) -> None:
        # The first report of a stage comes before it writes its checkpoint: the file on
        # disk then holds what the stage before it produced.
        if stage in seen:
            return
        seen.append(stage)
        if stage in ("decoder", "latents", "prior"):
            state = torch.load(ckpt, map_location="cpu", weights_only=False)
            before = {"decoder": "vae", "latents": "decoder", "prior": "latents"}[stage]
            if before == "latents":
                got[before] = _digest({"latents": state["latents"], "input_ids": state["input_ids"],
                                       "scaling_factor": torch.tensor(state["scaling_factor"])})
            else:
                got[before] = _digest(state["vae"])

    folder = Trainer(work, pinned_config(), on_progress).run()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    assert seen == ["vae", "decoder", "latents", "prior"]
    got["prior"] = _digest({"unet": state["unet"], "text": state["text"], "ema": state["ema"]["shadow_params"]})
    got["exported"] = _digest({p: load_file(str(folder / p)) for p in (
        "vae/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors")})
    assert got == EXPECTED
