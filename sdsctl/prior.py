"""Compatibility: the frozen model moved to the models layer, :mod:`sdsctl.models`.

``from sdsctl.prior import Prior`` keeps working for plugins written against sdsctl 0.1;
new code imports from ``sdsctl.models``.
"""

from sdsctl.models import SHAPES_PRIOR, Prior, describe, resolve_source  # noqa: F401

