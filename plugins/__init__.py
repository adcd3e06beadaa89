"""sdsctl's first-party plugins (import name ``sdsctl_plugins``).

Each module registers its components through the ``sdsctl`` entry-point group in
``pyproject.toml`` -- one line per module -- exactly as a third-party package would. Adding
a component means adding one module here and one entry-point line; no core code changes.
"""
