"""The interface every model family gives the guidance terms, and the family table.

Guidance terms, schedules and weightings see a model only through :class:`Prior`:

* ``prior.add_noise(z0, ε, t)``: ``z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε``, the model's own noise
  schedule (its scheduler's configuration read as a ``DDPMScheduler``, which shares the
  training schedule of the family's other schedulers); ``prior.alphas_cumprod`` (float32,
  on the device) and ``prior.num_train_timesteps``;
* ``prior.predict_noise(z_t, t, embeddings)``: ε for a batch of rows in one call of the
  denoiser, float32 whatever the weights' dtype. Whatever the model predicts natively is
  converted here and nowhere else (v- and sample-prediction, ``sdsctl.diffusion``); a
  family's own quirks (IF's learned-variance channels, SDXL's added conditions) stay in its
  module;
* ``prior.encode_images(rgb)`` / ``prior.decode_latents(z)``: RGB in [0, 1] to the space
  the model denoises in and back. ``prior.space`` is ``"latent"`` (a VAE: scaled latents) or
  ``"pixel"`` (no VAE: the image itself in [-1, 1]; ``vae_scale_factor`` is 1);
* ``prior.encode_prompts(prompts)``: the prompt embeddings, computed once per prompt
  (``RunContext.embeddings`` caches them), after which ``prior.release_text_encoders()``
  takes the text encoders off the device;
* ``prior.denoiser``: the network itself (a UNet today; ``prior.unet`` is kept as an alias),
  for a guidance that adapts it (VSD's LoRA).

**Packed embeddings.** Prompt embeddings are ONE tensor ``[n, L, D]`` per batch of rows, so
that guidance code batches rows with ``torch.cat`` and splits them with ``chunk`` without
knowing the family. A family whose denoiser needs more than one conditioning tensor packs
the extras into that tensor and unpacks them in its ``predict_noise``: SDXL appends one
sequence position holding the second text encoder's pooled embedding (zero-padded to D)
and builds its ``add_time_ids`` for every row of the batched call. A plugin must treat the
embeddings as opaque rows: concatenate, index, chunk -- never read positions or widths.

Adding a family is one module: a subclass of :class:`Prior` with its ``pipeline_class``
(the ``_class_name`` of ``model_index.json``), its ``_encode_prompts`` and ``_denoise``,
imported by ``sdsctl/models/__init__.py``. A flow-matching family converts its velocity to
ε inside its own ``_denoise``/``_to_eps`` and keeps this interface.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from .. import diffusion
from ..errors import SdsctlError
from . import sources

#: model_index.json ``_class_name`` -> the Prior subclass of that family (filled by subclassing)
FAMILIES: dict[str, type[Prior]] = {}


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What validation (and ``sdsctl model``) knows about a model, read without loading weights."""

    source: str  # the folder or hub id
    num_train_timesteps: int
    prediction_type: str
    vae_scale_factor: int  # pixels per latent pixel (1 in pixel space)
    latent_multiple: int  # the denoiser needs latent sizes divisible by this
    latent_channels: int  # from the VAE's config (the image's 3 in pixel space)
    latent_size: int  # native latent size
    max_prompt_tokens: int
    tokenizer: Any = dataclasses.field(default=None, repr=False, compare=False)
    family: str = "stable-diffusion"
    pipeline: str = "StableDiffusionPipeline"
    space: str = "latent"  # "latent" or "pixel"
    #: whether the tokenizer holds whole words as ``word</w>`` tokens (CLIP's BPE), so that
    #: a word without one is one the model has never seen whole
    whole_word_vocab: bool = True
    text_encoders: tuple[dict[str, Any], ...] = ()  # {"name", "class", "max_tokens", "parameters", "dtype"}
    weights: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # component -> {"class", "parameters", "dtype"}

    @property
    def image_size(self) -> int:
        """The native image resolution in pixels (the family's default resolution)."""
        return self.latent_size * self.vae_scale_factor

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of ``prompt`` the tokenizer holds no whole-word token for."""
        if self.tokenizer is None or not self.whole_word_vocab:
            return []
        from ..shapes.tokenizer import unknown_words

        return unknown_words(self.tokenizer, prompt)

    def to_dict(self) -> dict[str, Any]:
        """What ``sdsctl model --json`` prints."""
        return {
            "source": self.source, "family": self.family, "pipeline": self.pipeline,
            "prediction_type": self.prediction_type, "space": self.space,
            "latent_channels": self.latent_channels, "downscale_factor": self.vae_scale_factor,
            "default_resolution": self.image_size, "num_train_timesteps": self.num_train_timesteps,
            "text_encoders": [dict(t) for t in self.text_encoders],
            "parameters": {name: w["parameters"] for name, w in self.weights.items()},
            "dtype_on_disk": {name: w["dtype"] for name, w in self.weights.items()},
        }


def detect(folder: Path) -> type[Prior]:
    """The family of the pipeline folder ``folder``, from its ``model_index.json``."""
    index = sources.read_json(folder / "model_index.json")
    name = index.get("_class_name")
    if name not in FAMILIES:
        supported = ", ".join(f"{cls.family} ({cls.pipeline_class})" for cls in FAMILIES.values())
        raise SdsctlError(f"{folder}: pipeline class {name!r} (model_index.json) is not a family sdsctl supports; "
                          f"supported: {supported}")
    return FAMILIES[name]


def _quiet_loading() -> None:
    """diffusers/transformers print progress bars and notices while loading; not ours to show
    (``sdsctl -v`` sets ``SDSCTL_VERBOSE`` and shows them)."""
    import os

    if os.environ.get("SDSCTL_VERBOSE"):
        return
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    for log in (dlog, tlog):
        log.disable_progress_bar()
        log.set_verbosity_error()


def _dtype_keyword() -> str:
    """diffusers 0.42 renamed ``from_pretrained``'s ``torch_dtype`` to ``dtype`` (the old name warns)."""
    from importlib.metadata import version

    major, minor = (int(x) for x in version("diffusers").split(".")[:2])
    return "dtype" if (major, minor) >= (0, 42) else "torch_dtype"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Prior:
    """A frozen diffusers text-to-image model on one device, its weights in one dtype.

    ``Prior.load`` detects the family; a family subclass sets the class attributes below and
    implements ``_encode_prompts`` and ``_denoise``.
    """

    family: ClassVar[str] = ""
    pipeline_class: ClassVar[str] = ""  # model_index.json's _class_name
    space: ClassVar[str] = "latent"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    required: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    whole_word_vocab: ClassVar[bool] = True
    #: the pipeline's own prompt length where it does not take the tokenizer's
    prompt_tokens: ClassVar[int | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.pipeline_class:
            FAMILIES[cls.pipeline_class] = cls

    def __init__(self, pipe, *, device: torch.device, dtype: torch.dtype, source: str):
        from diffusers import DDPMScheduler

        self.pipe = pipe  # the family's diffusers pipeline: its own helpers encode prompts
        self.denoiser = pipe.unet
        self.vae = getattr(pipe, "vae", None)
        self.tokenizer = getattr(pipe, self.tokenizer_names[0])
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.device, self.dtype, self.source = torch.device(device), dtype, source
        for module in (self.denoiser, self.vae, *self.text_encoders):
            if module is not None:
                module.requires_grad_(False).eval().to(self.device)
        if self.vae is not None and dtype == torch.float16:
            if getattr(self.vae.config, "force_upcast", False):
                self.vae.to(torch.float32)  # as diffusers' pipelines do: the VAE overflows in float16
            else:  # the encoder's backward (RGB parameterizations) would underflow in float16
                self.vae.encoder.to(torch.float32)
                if self.vae.quant_conv is not None:
                    self.vae.quant_conv.to(torch.float32)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.vae is not None:
            self.scaling_factor = float(self.vae.config.scaling_factor)
            self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
            self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            self.latent_channels = int(self.vae.config.latent_channels)
        else:
            self.scaling_factor, self.shift_factor, self.vae_scale_factor = 1.0, 0.0, 1
            self.latent_channels = int(self.denoiser.config.in_channels)
        self.latent_size = int(self.denoiser.config.sample_size)
        self.image_size = self.latent_size * self.vae_scale_factor

    @property
    def unet(self):
        """The denoiser (the name the SD-only code used)."""
        return self.denoiser

    @property
    def text_encoders(self) -> list:
        return [m for m in (getattr(self.pipe, n, None) for n in self.text_encoder_names) if m is not None]

    # -- where models come from
    @classmethod
    def load(cls, path: str, device: torch.device, dtype: torch.dtype, *, variant: str | None = None,
             allow_download: bool = False) -> Prior:
        """Load ``shapes``, a folder or a hub id, weights read directly in ``dtype`` (and ``variant``)."""
        kind, source = sources.resolve_source(path)
        family = detect(sources.config_folder(kind, source, allow_download))
        _quiet_loading()
        try:
            pipe = family._pipeline_type().from_pretrained(
                source, **{_dtype_keyword(): dtype}, variant=variant, local_files_only=not allow_download,
                **family._load_kwargs())
        except (OSError, ValueError) as exc:
            hint = sources.hub_hint(source, allow_download) if kind == "hub" else f"cannot load the model in {source}"
            if variant:
                hint += f" (variant {variant!r}: are its files, e.g. unet/*.{variant}.safetensors, there?)"
            raise SdsctlError(f"{hint}\n  ({type(exc).__name__}: {exc})") from exc
        return family(pipe, device=device, dtype=dtype, source=source)

    @classmethod
    def describe(cls, path: str, *, variant: str | None = None, allow_download: bool = False) -> ModelInfo:
        """Read a model's configuration files (no weights) for validation and ``sdsctl model``."""
        kind, source = sources.resolve_source(path)
        folder = sources.config_folder(kind, source, allow_download)
        family = detect(folder)
        missing = [s for s in family.required if not (folder / s).is_dir()]
        if missing:
            raise SdsctlError(f"{source} is not a complete {family.pipeline_class} folder: it has no "
                              f"{', '.join(missing)} subfolder(s)")
        return family._describe(folder, source, variant)

    @classmethod
    def _pipeline_type(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class)

    @classmethod
    def _load_kwargs(cls) -> dict[str, Any]:
        """Components of the pipeline sdsctl does not use (safety checkers, ...): not loaded."""
        return {}

    @classmethod
    def _describe(cls, folder: Path, source: str, variant: str | None) -> ModelInfo:
        index = sources.read_json(folder / "model_index.json")
        unet = sources.read_json(folder / "unet" / "config.json")
        sched = sources.read_json(folder / "scheduler" / "scheduler_config.json")
        tokenizers = {name: cls._load_tokenizer(folder, name, index) for name in cls.tokenizer_names}
        if cls.space == "latent":
            vae = sources.read_json(folder / "vae" / "config.json")
            factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
            channels = int(vae.get("latent_channels", 4))
        else:
            factor, channels = 1, int(unet.get("in_channels", 3))
        weights = {}
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list) or entry[1] is None or name.startswith("tokenizer"):
                continue
            if name == "scheduler" or not (folder / name).is_dir():
                continue
            weights[name] = {"class": entry[1], **sources.weights_summary(folder / name, variant)}
        text_encoders = tuple(
            {"name": enc, "class": weights.get(enc, {}).get("class"),
             "max_tokens": cls.prompt_tokens or int(tok.model_max_length),
             "parameters": weights.get(enc, {}).get("parameters"), "dtype": weights.get(enc, {}).get("dtype")}
            for enc, tok in zip(cls.text_encoder_names, tokenizers.values()))
        first = tokenizers[cls.tokenizer_names[0]]
        return ModelInfo(
            source=source,
            num_train_timesteps=int(sched.get("num_train_timesteps", 1000)),
            prediction_type=str(sched.get("prediction_type", "epsilon")),
            vae_scale_factor=factor,
            latent_multiple=2 ** (len(unet.get("block_out_channels", [0] * 4)) - 1),
            latent_channels=channels,
            latent_size=int(unet.get("sample_size", 64)),
            max_prompt_tokens=cls.prompt_tokens or int(first.model_max_length),
            tokenizer=first,
            family=cls.family,
            pipeline=cls.pipeline_class,
            space=cls.space,
            whole_word_vocab=cls.whole_word_vocab,
            text_encoders=text_encoders,
            weights=weights,
        )

    @staticmethod
    def _load_tokenizer(folder: Path, name: str, index: dict):
        import transformers

        entry = index.get(name) or [None, "AutoTokenizer"]
        cls = getattr(transformers, entry[1], None) or transformers.AutoTokenizer
        try:
            return cls.from_pretrained(str(folder / name))
        except Exception as exc:
            raise SdsctlError(f"cannot load the tokenizer in {folder / name}: {type(exc).__name__}: {exc}") from exc

    def summary(self) -> dict[str, str]:
        """The ``model`` entry of a run's summary.json."""
        return {"family": self.family, "pipeline": self.pipeline_class, "prediction_type": self.prediction_type,
                "space": self.space, "dtype": _dtype_name(self.dtype), "source": self.source}

    # -- text
    def encode_prompts(self, prompts: list[str]) -> Tensor:
        """Prompt embeddings ``[n, L, D]``, one row per prompt (packed: see the module docstring)."""
        with torch.no_grad():
            return self._encode_prompts(list(prompts)).to(self.device)

    def _encode_prompts(self, prompts: list[str]) -> Tensor:
        raise NotImplementedError

    def _text_device(self) -> torch.device:
        return self.text_encoders[0].device

    def release_text_encoders(self) -> None:
        """Take the text encoders off the device once the run's prompts are encoded (they stay
        usable, on the CPU, should a component encode another prompt later)."""
        if self.device.type == "cpu":
            return
        for module in self.text_encoders:
            module.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def unknown_words(self, prompt: str) -> list[str]:
        if not self.whole_word_vocab:
            return []
        from ..shapes.tokenizer import unknown_words

        return unknown_words(self.tokenizer, prompt)

    # -- noise
    def _timesteps(self, t: int | Tensor, n: int) -> Tensor:
        t = torch.as_tensor(t, device=self.device, dtype=torch.long)
        return t.expand(n) if t.dim() == 0 else t

    def add_noise(self, z0: Tensor, eps: Tensor, t: int | Tensor) -> Tensor:
        """``z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε``, by the model's scheduler."""
        return self.scheduler.add_noise(z0, eps, self._timesteps(t, z0.shape[0]))

    def predict_noise(self, z_t: Tensor, t: int | Tensor, embeddings: Tensor) -> Tensor:
        """ε(z_t; y, t) for a batch in one denoiser call; float32 whatever the weights' dtype.

        ``t`` is one timestep for the whole batch or one per row; ``embeddings`` has one row
        per row of ``z_t``.
        """
        t = self._timesteps(t, z_t.shape[0])
        out = self._denoise(z_t.to(self.dtype), t, embeddings.to(self.dtype)).float()
        if self.prediction_type == "v_prediction":
            return diffusion.v_to_eps(out, z_t.float(), self.alphas_cumprod[t])
        if self.prediction_type == "sample":
            return diffusion.x0_to_eps(out, z_t.float(), self.alphas_cumprod[t])
        return out

    def _denoise(self, z_t: Tensor, t: Tensor, embeddings: Tensor) -> Tensor:
        """The denoiser's native prediction for the batch (in the weights' dtype)."""
        raise NotImplementedError

    # -- images
    def encode_images(self, rgb: Tensor) -> Tensor:
        """RGB images in [0, 1] in the model's space (latents: the posterior mean, scaled); differentiable."""
        if self.vae is None:
            return rgb.float() * 2 - 1
        posterior = self.vae.encode((rgb * 2 - 1).to(self.vae.encoder.conv_in.weight.dtype)).latent_dist
        return (posterior.mean.float() - self.shift_factor) * self.scaling_factor

    def decode_latents(self, z: Tensor) -> Tensor:
        """RGB images in [0, 1] of samples in the model's space."""
        if self.vae is None:
            x = z.float()
        else:
            x = self.vae.decode((z / self.scaling_factor + self.shift_factor).to(self.vae.decoder.conv_in.weight.dtype)).sample.float()
        return (x / 2 + 0.5).clamp(0, 1)
