"""One subpackage per method family: what only that method needs.

Each ``mmdiag.methods.<family>`` holds ``cli.py`` (a typer sub-app, mounted by the command line
as ``mmdiag <family> ...``), ``settings.py``, ``data.py``, ``fold.py`` (the per-fold trainer),
``figures.py`` and whatever else is only that method's. A configured method names its family
(``methods.<name>.family``); nothing else guesses it. See ``docs/adding-a-method.md``.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def method_families() -> list[str]:
    """The families that have a subpackage here, sorted."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if info.ispkg)


def family_module(family: str, module: str) -> ModuleType:
    """``mmdiag.methods.<family>.<module>``; ``ValueError`` naming the known families."""
    if family not in method_families():
        raise ValueError(f"unknown method family {family!r}; known: {method_families()}")
    return importlib.import_module(f"{__name__}.{family}.{module}")
