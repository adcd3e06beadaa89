"""Parameterization ``nerf``: a radiance field seen from the step's camera (3D; docs/3d.md).

The plugin's entry point: the class is in ``sdsctl_plugins.parameterizations.nerf``, imported
when the registry asks for parameterizations (``sdsctl --help`` does not import torch).
"""

from __future__ import annotations

import sdsctl


@sdsctl.hookimpl
def register_parameterizations(register):
    from .parameterizations.nerf import NeRF

    register("nerf", NeRF)
