"""Parameterization ``latent-pixels``: θ is the latent image itself (the study's EPL).

The plugin's entry point: the classes (``torch.nn.Module`` subclasses, and their options) are in
``sdsctl_plugins.parameterizations.latent_pixels``, imported when the registry asks for
parameterizations, so that loading the plugins -- ``sdsctl --help`` does -- does not import torch.
"""

from __future__ import annotations

import sdsctl


@sdsctl.hookimpl
def register_parameterizations(register):
    from .parameterizations.latent_pixels import LatentPixels

    register("latent-pixels", LatentPixels)
