"""Model ``diffusers``: a Stable Diffusion-style diffusers folder, a hub id, or ``shapes``.

``path: shapes`` (the default) is the small prior shipped in ``sdsctl/shapes/prior/``, trained
on the procedural shapes world; a folder is any diffusers SD pipeline folder (``unet``,
``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``); anything else of the form
``owner/name`` is a Hugging Face Hub id.
"""

from __future__ import annotations

import torch

import sdsctl
from sdsctl import prior
from sdsctl.components import ComponentConfig, Model, ModelInfo


class DiffusersModel(Model):
    class Config(ComponentConfig):
        name: str = "diffusers"
        path: str = "shapes"

    def describe(self) -> ModelInfo:
        return prior.describe(self.config.path)

    def load(self, device: torch.device, dtype: torch.dtype) -> prior.Prior:
        return prior.Prior.load(self.config.path, device, dtype)


@sdsctl.hookimpl
def register_models(register):
    register("diffusers", DiffusersModel)
