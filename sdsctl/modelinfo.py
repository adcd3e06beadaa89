"""What sdsctl knows about a model without loading its weights: :class:`ModelInfo`.

Validation (every component's ``check``), ``sdsctl model`` and the run's records read it; the
models layer (``sdsctl.models``) fills it from a pipeline folder's configuration files. It is
its own module, free of torch and of the model families, because components, recipes and
models all use it: each imports it from here, and none of them from another.

The model's geometry -- image size, VAE factor, what the denoiser can halve -- and its
vocabulary are stated here once (:meth:`ModelInfo.check_resolution`,
:meth:`ModelInfo.check_timestep`, :func:`unknown_words`); components ask, they do not
recompute.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from sdsctl.errors import InvalidConfig


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
    guidance_distilled: bool = False  # one conditional row gives a guided prediction (FLUX.1)
    guidance_embedded: bool = False  # the guidance scale is an input of the model (FLUX.1-dev)
    text_encoders: tuple[dict[str, Any], ...] = ()  # {"name", "class", "max_tokens", "parameters", "dtype"}
    #: component -> {"class", "parameters", "dtype"}
    weights: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def image_size(self) -> int:
        """The native image resolution in pixels (the family's default resolution)."""
        return self.latent_size * self.vae_scale_factor

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of ``prompt`` the tokenizer holds no whole-word token for."""
        if self.tokenizer is None or not self.whole_word_vocab:
            return []
        return unknown_words(self.tokenizer, prompt)

    def check_resolution(self, resolution: int | None) -> None:
        """Raise :class:`~sdsctl.errors.InvalidConfig` (field ``resolution``) unless the VAE's
        factor and the denoiser's downsampling both divide ``resolution`` (None: the native size)."""
        if resolution is None:
            return
        factor, multiple = self.vae_scale_factor, self.latent_multiple
        if resolution % factor:
            raise InvalidConfig(
                f"{resolution} is not divisible by the VAE's factor {factor}; "
                f"use a multiple of {factor * multiple} "
                f"(the model's native size is {self.image_size})", field="resolution")
        if (resolution // factor) % multiple:
            raise InvalidConfig(
                f"{resolution} gives latents of {resolution // factor} pixels, which the UNet cannot "
                f"halve {multiple.bit_length() - 1} times; use a multiple of {factor * multiple}",
                field="resolution")

    def check_timestep(self, t: int, field: str) -> None:
        """Raise :class:`~sdsctl.errors.InvalidConfig` (on ``field``) unless ``t`` is one of the
        model's timesteps 0..N−1."""
        if not 0 <= t < self.num_train_timesteps:
            raise InvalidConfig(f"{t} is outside the model's timesteps 0..{self.num_train_timesteps - 1}", field=field)

    def to_dict(self) -> dict[str, Any]:
        """What ``sdsctl model --json`` prints."""
        return {
            "source": self.source, "family": self.family, "pipeline": self.pipeline,
            "prediction_type": self.prediction_type, "space": self.space,
            "latent_channels": self.latent_channels, "downscale_factor": self.vae_scale_factor,
            "default_resolution": self.image_size, "num_train_timesteps": self.num_train_timesteps,
            "guidance_distilled": self.guidance_distilled, "guidance_embedded": self.guidance_embedded,
            "text_encoders": [dict(t) for t in self.text_encoders],
            "parameters": {name: w["parameters"] for name, w in self.weights.items()},
            "dtype_on_disk": {name: w["dtype"] for name, w in self.weights.items()},
        }


def unknown_words(tokenizer, prompt: str) -> list[str]:
    """Words of ``prompt`` that a CLIP-style tokenizer does not hold as a whole-word token.

    A word the model was trained on as a whole is a single ``word</w>`` token (CLIP's byte-pair
    vocabulary); anything else is split into pieces the model has never seen in that
    combination.
    """
    vocab = tokenizer.get_vocab()
    found = []
    for word in re.findall(r"[^\W\d_]+|\d", prompt.lower()):
        if word + "</w>" not in vocab or len(word) == 1 and word != "a":
            if word not in found:
                found.append(word)
    return found
