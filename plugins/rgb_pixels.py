"""Parameterization ``rgb-pixels``: θ is the RGB image itself, encoded by the VAE each step.

The plugin's entry point: the classes (``torch.nn.Module`` subclasses, and their options) are in
``sdsctl_plugins.parameterizations.rgb_pixels``, imported when the registry asks for
parameterizations, so that loading the plugins -- ``sdsctl --help`` does -- does not import torch.
"""

from __future__ import annotations

import sdsctl


@sdsctl.hookimpl
def register_parameterizations(register):
    from .parameterizations.rgb_pixels import RGBPixels

    register("rgb-pixels", RGBPixels)
