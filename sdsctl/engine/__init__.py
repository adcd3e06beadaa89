"""The engine: one run from a recipe to its run directory.

Recipe loading and validation, the step and the run's phases, the run directory, the live
panel and loggers. It imports sdsctl's API modules (``components``, ``diffusion``, ``errors``,
``models``, ``plugins``) and nothing of ``experiments``, ``diagnostics`` or ``shapes``.
"""
