"""The models layer: one module per model family behind one interface (``base.Prior``).

``Prior.load(path, device, dtype)`` reads the pipeline folder's ``model_index.json``, picks
the family module that handles its ``_class_name`` and loads the weights;
``Prior.describe(path)`` reads the configuration files alone. Guidance terms, schedules
and weightings see only the :class:`~sdsctl.models.base.Prior` interface, never a family.

| module | family | pipeline |
|---|---|---|
| ``stable_diffusion`` | SD 1.x / 2.x (and the shipped shapes prior) | ``StableDiffusionPipeline`` |
| ``sdxl`` | SDXL base | ``StableDiffusionXLPipeline`` |
| ``deepfloyd_if`` | DeepFloyd IF stage I (pixel space) | ``IFPipeline`` |
| ``sd3`` | Stable Diffusion 3 / 3.5 (flow matching) | ``StableDiffusion3Pipeline`` |
| ``flux`` | FLUX.1 dev and schnell (flow matching) | ``FluxPipeline`` |

The flow-matching families share ``flow.FlowPrior``, which keeps the interface in VP terms.
"""

from sdsctl.models import deepfloyd_if, flux, sd3, sdxl, stable_diffusion  # noqa: F401 -- each registers its family
from sdsctl.models.base import FAMILIES, ModelInfo, Prior, detect
from sdsctl.models.sources import SHAPES_PRIOR, resolve_source

describe = Prior.describe
load = Prior.load

__all__ = ["FAMILIES", "SHAPES_PRIOR", "ModelInfo", "Prior", "describe", "detect", "load", "resolve_source"]
