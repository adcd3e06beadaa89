"""sdsctl's first-party plugins (import name ``sdsctl_plugins``).

Each module registers its components through the ``sdsctl`` entry-point group in
``pyproject.toml`` -- one line per module -- exactly as a third-party package would. Adding
a component means adding one module here and one entry-point line; no core code changes.

Loading the plugins is cheap (``sdsctl --help`` loads them all): modules import torch and the
other heavy libraries inside the functions that use them, and the parameterizations -- which
are ``torch.nn.Module`` subclasses -- keep their classes in ``parameterizations/``, imported by
their registration hooks. Modules that are no plugin (``nfsd_terms``, ``parameterizations``)
hold what two plugins share; no plugin imports another plugin's module.
"""
