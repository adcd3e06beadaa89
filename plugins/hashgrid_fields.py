"""Parameterizations ``latent-hashgrid`` (the study's EHL) and ``rgb-hashgrid`` (EHC).

The plugin's entry point: the classes (``torch.nn.Module`` subclasses, and their options) are in
``sdsctl_plugins.parameterizations.hashgrid_fields``, imported when the registry asks for
parameterizations, so that loading the plugins -- ``sdsctl --help`` does -- does not import torch.
"""

from __future__ import annotations

import sdsctl


@sdsctl.hookimpl
def register_parameterizations(register):
    from .parameterizations.hashgrid_fields import LatentHashGrid, RGBHashGrid

    register("latent-hashgrid", LatentHashGrid)
    register("rgb-hashgrid", RGBHashGrid)
