"""The parameterization plugins' classes (``torch.nn.Module`` subclasses): not plugins themselves.

Each entry-point module (``sdsctl_plugins.latent_pixels``, ``.rgb_pixels``, ``.hashgrid_fields``)
imports its classes from here inside its registration hook, so that loading the plugins -- as
``sdsctl --help`` does -- does not import torch.
"""
