"""Metric ``image-stats``: colour, sharpness and structure of the final image, on any model.

The figures of ``sdsctl.engine.imagestats`` (saturation, colourfulness, clipped share, sharpness,
structure, two-tone share, brightness): they need no knowledge of the model's world, so
they apply to every prior and let ``sdsctl compare`` and ``sdsctl doctor`` say something
about a Stable Diffusion run too.
"""

from __future__ import annotations

import sdsctl
from sdsctl.components import Metric


class ImageStats(Metric):
    keys = ("saturation", "colorfulness", "clipped", "sharpness", "structure", "two_tone", "brightness")
    lower_is_better = ("clipped",)

    def __call__(self, image, prompt: str) -> dict:
        from sdsctl.engine import imagestats  # numpy: imported when used, not when the plugin loads

        return imagestats.stats(image)


@sdsctl.hookimpl
def register_metrics(register):
    register("image-stats", ImageStats)
