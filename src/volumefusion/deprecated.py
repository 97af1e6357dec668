"""Names that moved to another module stay importable from their old one for one release, with a
``DeprecationWarning`` that names the new home.

A module whose names moved ends with ``__getattr__ = moved(__name__, {"name": "new.module", ...})``.
The new modules are named as strings and imported on first use of an old name, so an alias is no
dependency of the old module (``tests/test_layers.py`` lists them apart from the import graph).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable
from typing import Any

REMOVED_IN = "0.3"
"""The release whose old names are gone."""


def moved(old_module: str, names: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old_module`` that resolves each of ``names`` (``{name: module it
    moved to}``) from its new module, warning that the old import path goes in :data:`REMOVED_IN`."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {old_module!r} has no attribute {name!r}")
        warnings.warn(f"{old_module}.{name} moved to {names[name]}.{name}; import it from there (the old path "
                      f"goes in volumefusion {REMOVED_IN})", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(names[name]), name)

    __getattr__.moved = dict(names)  # for tests/test_layers.py
    return __getattr__
