"""sdsctl: score distillation (SDS, NFSD, VSD, ...) as a command-line tool with plugins and recipes.

A plugin needs only ``import sdsctl``: ``@sdsctl.hookimpl`` marks its hook implementations
(see ``sdsctl.hookspecs`` and ``docs/plugins.md``).
"""

from importlib.metadata import PackageNotFoundError, version

from sdsctl.hookspecs import hookimpl

try:
    __version__ = version("sdsctl")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["__version__", "hookimpl"]
