"""The bundled model families, registered through ``register_families`` like any plugin's.

Stable Diffusion 1.x/2.x, SDXL, DeepFloyd IF stage I, SD3/3.5 and FLUX.1: one module each in
``sdsctl/models/`` (``docs/models.md``). The modules import torch and diffusers, so the hook
imports them when it is called (a model is described or loaded), not when the plugin loads.
"""

from __future__ import annotations

import sdsctl


@sdsctl.hookimpl
def register_families(register):
    from sdsctl.models.deepfloyd_if import IFPrior
    from sdsctl.models.flux import FluxPrior
    from sdsctl.models.sd3 import SD3Prior
    from sdsctl.models.sdxl import SDXLPrior
    from sdsctl.models.stable_diffusion import StableDiffusionPrior

    for family in (StableDiffusionPrior, SDXLPrior, IFPrior, SD3Prior, FluxPrior):
        register(family.family, family)
