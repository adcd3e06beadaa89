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
registered through the ``register_families`` hook (sdsctl's own: ``plugins/model_families.py``;
another package's: one entry point, docs/plugins.md). A flow-matching family (SD3, FLUX) derives from
:class:`~sdsctl.models.flow.FlowPrior`, which keeps this interface in VP terms (its ᾱ table,
``add_noise`` and ε, by ``sdsctl.diffusion``'s conversion).

**Guidance-distilled models.** ``prior.guidance_distilled`` says the model was distilled to
give guided predictions from one conditional row (FLUX.1-dev and -schnell): unconditional
rows are "true CFG", off its training distribution. ``prior.guidance_embedded`` says the
guidance scale is an input of the model (FLUX.1-dev): ``predict_noise(..., guidance=s)``.
Both are also in :class:`ModelInfo`, for the guidance terms' ``check``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

from sdsctl import diffusion
from sdsctl.errors import InvalidConfig, SdsctlError
from sdsctl.modelinfo import ModelInfo, unknown_words
from sdsctl.models.sources import (
    check_single_file,
    config_folder,
    hub_hint,
    library_detail,
    read_json,
    resolve_source,
    single_file,
    weights_summary,
)

#: model_index.json ``_class_name`` -> the Prior subclass of that family: every subclass
#: defined (imported) so far. The library's default; a run looks families up in the plugin
#: registry instead (``sdsctl.plugins.families()``, the ``register_families`` hook), which the
#: bundled families join like any other.
FAMILIES: dict[str, type[Prior]] = {}


def detect(folder: Path, families: dict[str, type[Prior]] | None = None) -> type[Prior]:
    """The family of the pipeline folder ``folder``, from its ``model_index.json``, among
    ``families`` (pipeline class -> family; None: :data:`FAMILIES`)."""
    families = FAMILIES if families is None else families
    index = read_json(folder / "model_index.json")
    name = index.get("_class_name")
    if name not in families:
        supported = ", ".join(f"{cls.family} ({cls.pipeline_class})" for cls in families.values())
        raise SdsctlError(f"{folder}: pipeline class {name!r} (model_index.json) is not a family sdsctl supports; "
                          f"supported: {supported}. A plugin adds a family: docs/plugins.md, \"model family\"")
    return families[name]


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


class _Where(NamedTuple):
    """Where a model's files are: ``model.path`` and ``model.config`` resolved."""

    file: Path | None  # the single-file checkpoint, or None for a folder or hub id
    kind: str  # where the configuration files are: "folder" or "hub" (``sources.resolve_source``)
    source: str  # the configuration files' folder or hub id
    named: str  # the source as a summary names it


def _where(path: str, config: str | None) -> _Where:
    """``model.path`` and ``model.config`` resolved; ``config`` belongs to single files, and a
    single file needs it."""
    file = single_file(path)
    if config and not file:
        raise InvalidConfig(f"config ({config}) describes a single-file checkpoint's architecture; model.path "
                            f"{path!r} is not a .safetensors or .ckpt file, so leave config out", field="config")
    if file and not config:
        raise InvalidConfig(f"{path} is a single-file checkpoint: say which architecture it is with model.config, "
                            "a diffusers folder or hub id of the same model, e.g. the base model it was "
                            "fine-tuned from (--set model.config=DIR; sdsctl model FILE --config DIR)", field="path")
    if file:
        check_single_file(file)
    kind, source = resolve_source(config if file else path)
    return _Where(file, kind, source, f"{file} (architecture: {source})" if file else source)


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
    denoiser_name: ClassVar[str] = "unet"  # the pipeline's component that denoises
    guidance_distilled: ClassVar[bool] = False
    #: a class default: a family may say it per model (FLUX: the transformer's ``guidance_embeds``)
    guidance_embedded: bool = False
    #: text encoders the family can do without (``model.without``), as diffusers allows
    optional_text_encoders: ClassVar[tuple[str, ...]] = ()
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    required: ClassVar[tuple[str, ...]] = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    whole_word_vocab: ClassVar[bool] = True
    #: the pipeline's own prompt length where it does not take the tokenizer's
    prompt_tokens: ClassVar[int | None] = None
    #: per text encoder, where the pipeline pads to its own length (a T5 ``max_sequence_length``)
    encoder_tokens: ClassVar[dict[str, int]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.pipeline_class:
            FAMILIES[cls.pipeline_class] = cls

    def __init__(self, pipe, *, device: torch.device, dtype: torch.dtype, source: str):
        self.pipe = pipe  # the family's diffusers pipeline: its own helpers encode prompts
        self.denoiser = getattr(pipe, self.denoiser_name)
        self.vae = getattr(pipe, "vae", None)
        self.tokenizer = getattr(pipe, self.tokenizer_names[0])
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
        if self.vae is not None:
            self.scaling_factor = float(self.vae.config.scaling_factor)
            self.shift_factor = float(getattr(self.vae.config, "shift_factor", None) or 0.0)
            self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            self.latent_channels = int(self.vae.config.latent_channels)
        else:
            self.scaling_factor, self.shift_factor, self.vae_scale_factor = 1.0, 0.0, 1
            self.latent_channels = int(self.denoiser.config.in_channels)
        self.latent_size = self._latent_size(self.denoiser.config)
        self.image_size = self.latent_size * self.vae_scale_factor
        self._noise_schedule(pipe.scheduler.config)

    def _noise_schedule(self, config) -> None:
        """``scheduler``, ``alphas_cumprod``, ``num_train_timesteps``, ``prediction_type``: the
        model's training schedule, its scheduler's configuration read as a ``DDPMScheduler``."""
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(config)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.prediction_type = self.scheduler.config.prediction_type

    @classmethod
    def _latent_size(cls, denoiser_config) -> int:
        """The native latent size (the family's default resolution over the VAE factor)."""
        return int(denoiser_config["sample_size"] if isinstance(denoiser_config, dict) else denoiser_config.sample_size)

    @classmethod
    def _latent_multiple(cls, denoiser_config: dict) -> int:
        """What the denoiser needs latent sizes divisible by (a UNet: 2 per downsampling)."""
        return 2 ** (len(denoiser_config.get("block_out_channels", [0] * 4)) - 1)

    def latent_shape(self, resolution: int | None = None) -> tuple[int, int, int, int]:
        """``(1, C, h, w)``: the shape of what the model denoises for a square image of
        ``resolution`` pixels (None: the native size); in pixel space, the image's."""
        size = (resolution or self.image_size) // self.vae_scale_factor
        return (1, self.latent_channels, size, size)

    def set_image_size(self, height: int, width: int) -> None:
        """The size in pixels of the images a run optimizes, told before the guidance and the
        weighting start. A family whose noise schedule depends on it (FLUX.1-dev's
        resolution-dependent shift) rebuilds ``alphas_cumprod`` here; the default does nothing."""

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
             allow_download: bool = False, without: tuple[str, ...] = (), config: str | None = None,
             families: dict[str, type[Prior]] | None = None) -> Prior:
        """Load ``shapes``, a folder or a hub id, weights read directly in ``dtype`` (and ``variant``);
        ``without``: text encoders to leave out, where the family allows it (SD3's T5). A
        single-file checkpoint (``path`` a .safetensors or .ckpt file in the original layout, as
        model sites share them) is read by diffusers' ``from_single_file`` with the architecture
        of ``config``, a folder or hub id of the same model. ``families``: those to detect the
        model's among (:func:`detect`)."""
        file, kind, source, named = _where(path, config)
        family = detect(config_folder(kind, source, allow_download), families)
        family._check_without(without)
        _quiet_loading()
        try:
            if file:
                pipe = family._single_file(file, source, dtype, allow_download, without)
            else:
                pipe = family._pipeline_type().from_pretrained(
                    source, **{_dtype_keyword(): dtype}, variant=variant, local_files_only=not allow_download,
                    **family._load_kwargs(), **family._without_kwargs(without))
        except (OSError, ValueError) as exc:
            hint = hub_hint(source, allow_download) if kind == "hub" else f"cannot load the model in {source}"
            if variant:
                hint += f" (variant {variant!r}: are its files, e.g. unet/*.{variant}.safetensors, there?)"
            raise SdsctlError(f"{hint}\n  {library_detail(exc)}") from exc
        return family(pipe, device=device, dtype=dtype, source=named)

    @classmethod
    def describe(cls, path: str, *, variant: str | None = None, allow_download: bool = False,
                 without: tuple[str, ...] = (), config: str | None = None,
                 families: dict[str, type[Prior]] | None = None) -> ModelInfo:
        """Read a model's configuration files (no weights) for validation and ``sdsctl model``
        (a single-file checkpoint's: ``config``'s, with the file as its source)."""
        file, kind, source, named = _where(path, config)
        folder = config_folder(kind, source, allow_download)
        family = detect(folder, families)
        family._check_without(without)
        missing = [s for s in family.required if not (folder / s).is_dir()]
        if missing:
            raise SdsctlError(f"{source} is not a complete {family.pipeline_class} folder: it has no "
                              f"{', '.join(missing)} subfolder(s)")
        info = family._describe(folder, source, variant, tuple(without))
        return dataclasses.replace(info, source=named) if file else info

    @classmethod
    def _check_without(cls, without) -> None:
        wrong = [name for name in without if name not in cls.optional_text_encoders]
        if wrong:
            allowed = ", ".join(cls.optional_text_encoders) or "none"
            raise InvalidConfig(f"{cls.pipeline_class} ({cls.family}) cannot do without {', '.join(wrong)}; "
                                f"the text encoders it can leave out: {allowed}", field="without")

    @classmethod
    def _without_kwargs(cls, without) -> dict[str, None]:
        """``from_pretrained`` keywords leaving out text encoders (and their tokenizers)."""
        out = {}
        for name in without:
            out[name] = None
            out[cls.tokenizer_names[cls.text_encoder_names.index(name)]] = None
        return out

    @classmethod
    def _single_file(cls, file: Path, config: str, dtype: torch.dtype, allow_download: bool, without) -> Any:
        """The pipeline of a single-file checkpoint, its architecture read from ``config``."""
        pipeline = cls._pipeline_type()
        if not hasattr(pipeline, "from_single_file"):
            raise SdsctlError(f"{cls.pipeline_class} ({cls.family}) cannot load single-file checkpoints in diffusers; "
                              "use a diffusers folder")
        return pipeline.from_single_file(str(file), config=config, **{_dtype_keyword(): dtype},
                                         local_files_only=not allow_download, **cls._load_kwargs(),
                                         **cls._without_kwargs(without))

    @classmethod
    def _pipeline_type(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class)

    @classmethod
    def _load_kwargs(cls) -> dict[str, Any]:
        """Components of the pipeline sdsctl does not use (safety checkers, ...): not loaded."""
        return {}

    @classmethod
    def _describe(cls, folder: Path, source: str, variant: str | None, without: tuple[str, ...] = ()) -> ModelInfo:
        index = read_json(folder / "model_index.json")
        unet = read_json(folder / cls.denoiser_name / "config.json")
        sched = read_json(folder / "scheduler" / "scheduler_config.json")
        present = [(enc, tok) for enc, tok in zip(cls.text_encoder_names, cls.tokenizer_names)
                   if enc not in without and (index.get(enc) or [None, None])[1] is not None]
        tokenizers = {tok: cls._load_tokenizer(folder, tok, index) for _, tok in present}
        if cls.space == "latent":
            vae = read_json(folder / "vae" / "config.json")
            factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
            channels = int(vae.get("latent_channels", 4))
        else:
            factor, channels = 1, int(unet.get("in_channels", 3))
        weights = {}
        for name, entry in index.items():
            if name.startswith("_") or not isinstance(entry, list) or entry[1] is None or name.startswith("tokenizer"):
                continue
            if name in without:
                continue
            if name == "scheduler" or not (folder / name).is_dir():
                continue
            weights[name] = {"class": entry[1], **weights_summary(folder / name, variant)}
        text_encoders = tuple(
            {"name": enc, "class": weights.get(enc, {}).get("class"),
             "max_tokens": cls.encoder_tokens.get(enc) or cls.prompt_tokens or int(tok.model_max_length),
             "parameters": weights.get(enc, {}).get("parameters"), "dtype": weights.get(enc, {}).get("dtype")}
            for (enc, _), tok in zip(present, tokenizers.values()))
        first = tokenizers[cls.tokenizer_names[0]]
        return ModelInfo(
            source=source,
            num_train_timesteps=int(sched.get("num_train_timesteps", 1000)),
            prediction_type=cls._prediction_type(sched),
            vae_scale_factor=factor,
            latent_multiple=cls._latent_multiple(unet),
            latent_channels=channels,
            latent_size=cls._latent_size({"sample_size": 64, **unet}),
            max_prompt_tokens=cls.prompt_tokens or int(first.model_max_length),
            tokenizer=first,
            family=cls.family,
            pipeline=cls.pipeline_class,
            space=cls.space,
            whole_word_vocab=cls.whole_word_vocab,
            guidance_distilled=cls.guidance_distilled,
            guidance_embedded=cls.guidance_embedded,
            text_encoders=text_encoders,
            weights=weights,
        )

    @classmethod
    def _prediction_type(cls, scheduler_config: dict) -> str:
        return str(scheduler_config.get("prediction_type", "epsilon"))

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
        return unknown_words(self.tokenizer, prompt)

    # -- noise
    def _timesteps(self, t: int | Tensor, n: int) -> Tensor:
        t = torch.as_tensor(t, device=self.device, dtype=torch.long)
        return t.expand(n) if t.dim() == 0 else t

    def add_noise(self, z0: Tensor, eps: Tensor, t: int | Tensor) -> Tensor:
        """``z_t = √ᾱ_t z_0 + √(1 − ᾱ_t) ε``, by the model's scheduler."""
        return self.scheduler.add_noise(z0, eps, self._timesteps(t, z0.shape[0]))

    def predict_noise(self, z_t: Tensor, t: int | Tensor, embeddings: Tensor, guidance: float | None = None) -> Tensor:
        """ε(z_t; y, t) for a batch in one denoiser call; float32 whatever the weights' dtype.

        ``t`` is one timestep for the whole batch or one per row; ``embeddings`` has one row
        per row of ``z_t``. ``guidance``: the guidance scale fed to a model that takes one
        (``guidance_embedded``; None: its rows are plain conditional/unconditional ones).
        """
        if guidance is not None:
            raise ValueError(f"{self.pipeline_class} takes no guidance scale as an input (guidance_embedded is False)")
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

    # -- speed
    def accelerate(self, *, channels_last: bool = False, compile: bool = False, backend: str = "inductor") -> None:
        """The fast paths a recipe asks for (``channels_last``, ``compile``); idempotent, so a
        model shared by several runs is changed once.

        ``channels_last`` stores the denoiser's and the VAE's convolution weights in NHWC, the
        layout tensor cores read directly. ``compile`` wraps the denoiser in ``torch.compile``
        with static shapes (``dynamic=False``: a guidance keeps its batch shape from step to
        step, and timesteps are tensors, so one graph per batch shape) and, on CUDA, CUDA graphs
        (``mode="reduce-overhead"``). Attention already runs through PyTorch's SDPA (diffusers'
        default processor on torch 2). ``backend`` is torch.compile's (tests trace with
        ``aot_eager``, which skips code generation).
        """
        if channels_last and not getattr(self, "_channels_last", False):
            for module in (self.denoiser, self.vae):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
            self._channels_last = True
        if compile and not getattr(self, "_compiled", False):
            mode = "reduce-overhead" if self.device.type == "cuda" and backend == "inductor" else None
            self.denoiser.compile(dynamic=False, mode=mode, backend=backend)
            self._compiled = True

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
            scaled = (z / self.scaling_factor + self.shift_factor).to(self.vae.decoder.conv_in.weight.dtype)
            x = self.vae.decode(scaled).sample.float()
        return (x / 2 + 0.5).clamp(0, 1)
