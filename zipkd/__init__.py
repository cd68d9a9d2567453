"""zipkd: hardware-aware structured pruning, recovery, quantization and evaluation of causal LMs.

Importing zipkd is cheap (no torch); the Python API is loaded on first use:

    from zipkd import load_model, save_model, prune, PruneConfig
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "ZipkdError": "zipkd.errors",
    "load_model": "zipkd.models.io",
    "save_model": "zipkd.models.io",
    "resolve_model": "zipkd.models.io",
    "LayerShape": "zipkd.models.surgery",
    "layer_shapes": "zipkd.models.surgery",
    "perplexity": "zipkd.evaluate.perplexity",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zipkd' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = ["__version__", *_LAZY]
