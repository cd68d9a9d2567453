"""Pruning methods, one module each, registered by name in `METHODS` (see `base.py`). Adding a method is adding
a module here: every module of this package is imported, and each registers itself with `@register`."""

from __future__ import annotations

import importlib
import pkgutil

from zipkd.prune.methods.base import (
    METHODS,
    LayerStats,
    PruneMethod,
    describe,
    get_method,
    method_help,
    register,
)

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda i: (i.name != "zipkd", i.name)):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["METHODS", "LayerStats", "PruneMethod", "describe", "get_method", "method_help", "register"]
