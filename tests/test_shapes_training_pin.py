"""The default training (`TrainConfig()`, what `sdsctl train-shapes` runs) pinned by hashes.

A few steps of every stage that the defaults run, on small models, hashed stage by stage:
any change to the shipped recipe (a loss term, a batch's composition, a seed, the order of
random draws) changes a hash, so a refactoring of the training code can show that it trains
exactly as before. Only the step counts, batch sizes, world size and model widths are
overridden; every other field keeps its default.

The hashes are of the CPU's results at one thread with deterministic algorithms; another
machine or PyTorch release may round differently, so there is one table per machine the
training was pinned on (``EXPECTED_BY_MACHINE``), and the result must match one of them. If a
hash changes on purpose (the recipe changed), say so in CHANGELOG.md and replace the tables.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from sdsctl.shapes.train import TrainConfig, Trainer

#: stage -> sha256 of the weights it produced (see :func:`_digest`), one table per machine the
#: training has been pinned on: the floating-point results of the same code differ between
#: them (the same torch 2.13.0+cpu wheel). A change to the training matches neither table.
EXPECTED_BY_MACHINE = {
    # the machine of 2026-12-03/04 (the first pin; CI passed on it)
    "2026-12-03": {
        "vae": "3db9910160f95f36de4977ba3b353e159247a61e3600e5070de2b50900913c16",
        "decoder": "85fa4148d54418fa0a14ad28b0672228c2691084b72f6fdef1d10ce10d0c2d39",
        "latents": "876609e78a3d47e983c653ceb598c5ed11217c4879eeed3f65e63a55954b8b95",
        "prior": "b2140342781b270e8f46ea7f632a7de930377ae6c324bab46a44ac225fb63231",
        "exported": "180c81e4b61f1a06ce12e8a8b5faff3f44e188081743326bef78018374b7c3a2",
    },
    # the machine of 2026-12-06 (Xeon with AVX-512 and AMX; numpy 2.4.6, pillow 13.0.0,
    # transformers 5.25.0): the landed code of 2026-12-04 gives these too, and older numpy,
    # pillow or transformers releases do not change them
    "2026-12-06": {
        "vae": "b723b8651b9b6e47f4cd4ad70326ec485a86de156fb4e325ff1777ab2ddf34f4",
        "decoder": "8a4d9cab030563fb9b53edf8c08c182169348a10a48f987a84a93904c38a7dab",
        "latents": "8a0a964cbaed13e3c2e6bd6f55a834d92b6e7da7b6b37134dbff26fde0cf2dc5",
        "prior": "c2db84f4928cf2c873932b7c621f58b99384fa9c684db6a49d5a362512a3fba4",
        "exported": "e29bf122dd1bfa463bb39f382de19af1f5f5769a5b337cb47a1ad00fb914381b",
    },
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
    assert got in EXPECTED_BY_MACHINE.values(), got
