"""Model ``diffusers``: a diffusers pipeline folder, a hub id, or ``shapes``.

``path: shapes`` (the default) is the small prior shipped in ``sdsctl/shapes/prior/``, trained
on the procedural shapes world; a folder is a diffusers pipeline folder of a registered family
(SD 1.x/2.x, SDXL, DeepFloyd IF stage I, SD3/3.5, FLUX.1: ``docs/models.md``; or a plugin's,
through the ``register_families`` hook), detected from its ``model_index.json``; anything else
of the form ``owner/name`` is a Hugging Face Hub id, taken from the local cache unless
``allow_download`` is set. ``variant`` picks the weight files (e.g. ``fp16`` for
``*.fp16.safetensors``); the recipe's ``dtype`` is the dtype the weights are loaded in.
``without`` leaves out text encoders the family can do without (SD3's T5, ``text_encoder_3``:
its part of the prompt embedding is then zeros, as in diffusers).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

import sdsctl
from sdsctl import plugins
from sdsctl.components import ComponentConfig, Model, ModelInfo

if TYPE_CHECKING:  # the models layer (torch, diffusers) is imported where it is used: loading the plugin stays light
    import torch

    from sdsctl.models import Prior


class DiffusersModel(Model):
    class Config(ComponentConfig):
        name: str = "diffusers"
        path: str = "shapes"
        variant: str | None = Field(None, description="weight files' variant, e.g. fp16 (unet/*.fp16.safetensors)")
        allow_download: bool = Field(False, description="download a hub id missing from the local cache")
        without: list[str] = Field(default_factory=list, description="text encoders to leave out where the family "
                                   "allows it, e.g. [text_encoder_3]: SD3 without T5")
        config: str | None = Field(None, description="for a single-file checkpoint (path: a .safetensors or .ckpt "
                                   "file as model sites share them): a diffusers folder or hub id of the same "
                                   "architecture, e.g. the base model it was fine-tuned from")

    def describe(self) -> ModelInfo:
        from sdsctl.models import Prior

        c = self.config
        return Prior.describe(c.path, variant=c.variant, allow_download=c.allow_download, without=tuple(c.without),
                              config=c.config, families=plugins.families())

    def load(self, device: torch.device, dtype: torch.dtype) -> Prior:
        from sdsctl.models import Prior

        c = self.config
        return Prior.load(c.path, device, dtype, variant=c.variant, allow_download=c.allow_download,
                          without=tuple(c.without), config=c.config, families=plugins.families())


@sdsctl.hookimpl
def register_models(register):
    register("diffusers", DiffusersModel)
