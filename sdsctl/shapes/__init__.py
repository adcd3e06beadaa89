"""The shapes world: procedural images, their judge, and the training of the prior shipped in ``prior/``.

A user of the core (``docs/architecture.md``): it imports sdsctl's modules, the core never imports it.
"""
