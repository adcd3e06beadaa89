"""Parameterization ``mesh-texture``: a colour field painted on a given mesh from many views (3D; docs/3d.md).

The plugin's entry point: the class is in ``sdsctl_plugins.parameterizations.mesh_texture``,
imported when the registry asks for parameterizations (``sdsctl --help`` does not import torch).
"""

from __future__ import annotations

import sdsctl


@sdsctl.hookimpl
def register_parameterizations(register):
    from .parameterizations.mesh_texture import MeshTexture

    register("mesh-texture", MeshTexture)
