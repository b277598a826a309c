"""Packages only some tasks need, imported when those tasks are used.

h5py reads SHD, Pillow reads and draws Pathfinder images; everything else runs
without them. A missing one is a user-facing :class:`MissingDependency` naming
the pip command, not an ImportError.
"""

import importlib
import os
import shlex

from elmcore.errors import ELMError

# module -> (distribution, elmcore extra, who needs it)
OPTIONAL = {
    "h5py": ("h5py", "shd", "the SHD and SHD-Adding tasks (HDF5 files)"),
    "PIL": ("Pillow", "images", "the Pathfinder / Path-X tasks (PNG images)"),
}


def install_command(extra):
    """The pip command that adds elmcore's ``extra`` the way this copy was installed: from its checkout
    (``pip install -e '<checkout>[extra]'``) when it runs from one, else from the package index."""
    checkout = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if os.path.isfile(os.path.join(checkout, "pyproject.toml")):
        return f"pip install -e {shlex.quote(f'{checkout}[{extra}]')}"
    return f"pip install 'elmcore[{extra}]'"


class MissingDependency(ELMError):
    """An optional package a task needs is not installed."""


def require(module):
    """Import ``module`` (a key of :data:`OPTIONAL` or a submodule of one) or raise
    :class:`MissingDependency` saying how to install it."""
    distribution, extra, needed_by = OPTIONAL[module.split(".")[0]]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(f"{needed_by} need the optional package {distribution}: "
                                f"{install_command(extra)}") from None
