"""The frozen text-to-image model (the "prior") and where it comes from.

:class:`Prior` wraps a diffusers Stable Diffusion folder's components -- UNet, VAE, CLIP
text encoder and tokenizer, scheduler -- and states the conventions once:

* ``alphas_cumprod`` and ``add_noise`` come from the model's own scheduler (read as a
  ``DDPMScheduler``, which shares the training noise schedule of SD's other schedulers);
* ``predict_noise`` is one batched UNet call returning ε; v-prediction and sample-prediction
  models are converted here and nowhere else;
* ``encode_images`` / ``decode_latents`` scale by ``vae.config.scaling_factor``.

Model sources (:func:`resolve_source`): ``shapes`` (the prior shipped in
``sdsctl/shapes/prior/``), a local folder, or a Hugging Face Hub id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor

from . import diffusion
from .components import InvalidConfig, ModelInfo
from .errors import SdsctlError

SHAPES_PRIOR = Path(__file__).parent / "shapes" / "prior"
SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_source(path: str) -> tuple[str, str]:
    """``("folder", path)`` or ``("hub", id)`` for a recipe's ``model.path``."""
    if path == "shapes":
        if not (SHAPES_PRIOR / "model_index.json").is_file():
            raise InvalidConfig(
                f"the shapes prior is not installed (expected in {SHAPES_PRIOR}); it is the product "
                "of the shapes training (`sdsctl train-shapes`) -- until it is there, use a diffusers "
                "Stable Diffusion folder: --model DIR (or model: DIR in the recipe)",
                field="path",
            )
        return "folder", str(SHAPES_PRIOR)
    folder = Path(path).expanduser()
    if folder.is_dir():
        missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (folder / s).is_dir()]
        if missing:
            raise InvalidConfig(
                f"{path} is not a diffusers Stable Diffusion folder: it has no {', '.join(missing)} "
                "subfolder(s)",
                field="path",
            )
        return "folder", str(folder)
    if folder.exists():
        raise InvalidConfig(f"{path} is a file; the model is a diffusers folder or a hub id", field="path")
    if _HUB_ID.match(path) and not path.startswith((".", "~")):
        return "hub", path
    raise InvalidConfig(f"model folder {path} not found (nor is it a hub id like 'owner/name')", field="path")


def _hub_hint(repo_id: str) -> str:
    return (
        f"could not get model {repo_id!r} from the Hugging Face Hub (no network, and not in the "
        f"local cache?). To use a local copy, download it on a machine with network: "
        f"`hf download {repo_id} --local-dir DIR` (older huggingface_hub: `huggingface-cli "
        f"download {repo_id} --local-dir DIR`), then pass --model DIR"
    )


def config_folder(kind: str, source: str) -> Path:
    """A local folder holding the model's configuration files (downloads them for a hub id)."""
    if kind == "folder":
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(
            source,
            allow_patterns=["model_index.json", "*/config.json", "scheduler/*.json", "tokenizer/*"],
        ))
    except Exception as exc:
        raise SdsctlError(f"{_hub_hint(source)}\n  ({type(exc).__name__}: {exc})") from exc


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SdsctlError(f"cannot read the model's configuration {path}: {exc}") from exc


def load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")


def describe(path: str) -> ModelInfo:
    """Read a model's configuration files (no weights) for validation."""
    kind, source = resolve_source(path)
    folder = config_folder(kind, source)
    unet = _read_json(folder / "unet" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    sched = _read_json(folder / "scheduler" / "scheduler_config.json")
    try:
        tokenizer = load_tokenizer(folder)
    except Exception as exc:
        raise SdsctlError(f"cannot load the tokenizer of {source}: {type(exc).__name__}: {exc}") from exc
    return ModelInfo(
        source=source,
        num_train_timesteps=int(sched.get("num_train_timesteps", 1000)),
        prediction_type=str(sched.get("prediction_type", "epsilon")),
        vae_scale_factor=2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1),
        latent_multiple=2 ** (len(unet.get("block_out_channels", [0] * 4)) - 1),
        latent_channels=int(unet.get("in_channels", 4)),
        latent_size=int(unet.get("sample_size", 64)),
        max_prompt_tokens=int(tokenizer.model_max_length),
        tokenizer=tokenizer,
    )


def _quiet_loading() -> None:
    """diffusers/transformers print progress bars and notices while loading; not ours to show."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for log in (dlog, tlog):
        log.disable_progress_bar()
        log.set_verbosity_error()


class Prior:
    """A frozen diffusers text-to-image model on one device, in one compute dtype."""

    def __init__(self, *, unet, vae, text_encoder, tokenizer, scheduler, device: torch.device,
                 dtype: torch.dtype, source: str):
        self.unet, self.vae, self.text_encoder = unet, vae, text_encoder
        self.tokenizer, self.scheduler = tokenizer, scheduler
        self.device, self.dtype, self.source = torch.device(device), dtype, source
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False).eval().to(self.device, dtype)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = scheduler.config.prediction_type
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(getattr(vae.config, "shift_factor", None) or 0.0)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(unet.config.in_channels)
        self.latent_size = int(unet.config.sample_size)
        self.image_size = self.latent_size * self.vae_scale_factor

    @classmethod
    def load(cls, path: str, device: torch.device, dtype: torch.dtype) -> Prior:
        """Load from ``shapes``, a folder or a hub id (weights in float32, then cast)."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        kind, source = resolve_source(path)
        _quiet_loading()
        try:
            parts = dict(
                unet=UNet2DConditionModel.from_pretrained(source, subfolder="unet"),
                vae=AutoencoderKL.from_pretrained(source, subfolder="vae"),
                text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder"),
                tokenizer=CLIPTokenizer.from_pretrained(source, subfolder="tokenizer"),
                scheduler=DDPMScheduler.from_pretrained(source, subfolder="scheduler"),
            )
        except (OSError, ValueError) as exc:
            if kind == "hub":
                raise SdsctlError(f"{_hub_hint(source)}\n  ({type(exc).__name__}: {exc})") from exc
            raise SdsctlError(f"cannot load the model in {source}: {type(exc).__name__}: {exc}") from exc
        return cls(**parts, device=device, dtype=dtype, source=source)

    # -- text
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Text embeddings ``[n, L, D]`` (the text encoder's last hidden state)."""
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids.to(self.device)
        with torch.no_grad():
            return self.text_encoder(ids)[0]

    def unknown_words(self, prompt: str) -> list[str]:
        from .shapes.tokenizer import unknown_words

        return unknown_words(self.tokenizer, prompt)

    # -- noise
    def _timesteps(self, t: int | Tensor, n: int) -> Tensor:
        t = torch.as_tensor(t, device=self.device, dtype=torch.long)
        return t.expand(n) if t.dim() == 0 else t

    def add_noise(self, z0: Tensor, eps: Tensor, t: int | Tensor) -> Tensor:
        """``z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε``, by the model's scheduler."""
        return self.scheduler.add_noise(z0, eps, self._timesteps(t, z0.shape[0]))

    def predict_noise(self, z_t: Tensor, t: int | Tensor, embeddings: Tensor) -> Tensor:
        """ε(z_t; y, t) for a batch in one UNet call; float32 whatever the compute dtype.

        ``t`` is one timestep for the whole batch or one per row; ``embeddings`` has one row
        per row of ``z_t``.
        """
        t = self._timesteps(t, z_t.shape[0])
        out = self.unet(z_t.to(self.dtype), t, encoder_hidden_states=embeddings.to(self.dtype)).sample.float()
        if self.prediction_type == "v_prediction":
            return diffusion.v_to_eps(out, z_t.float(), self.alphas_cumprod[t])
        if self.prediction_type == "sample":
            return diffusion.x0_to_eps(out, z_t.float(), self.alphas_cumprod[t])
        return out

    # -- images
    def encode_images(self, rgb: Tensor) -> Tensor:
        """Latents of RGB images in [0, 1] (the posterior mean, scaled); differentiable."""
        posterior = self.vae.encode((rgb * 2 - 1).to(self.dtype)).latent_dist
        return ((posterior.mean.float() - self.shift_factor) * self.scaling_factor)

    def decode_latents(self, z: Tensor) -> Tensor:
        """RGB images in [0, 1] of scaled latents."""
        x = self.vae.decode((z / self.scaling_factor + self.shift_factor).to(self.dtype)).sample.float()
        return (x / 2 + 0.5).clamp(0, 1)
