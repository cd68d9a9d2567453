"""Quantization back ends (bitsandbytes, optimum-quanto) behind one API: see `zipkd.quantize.api`.

Importing the package is cheap (no torch): it registers the loader of quantized folders with `zipkd.models.formats`
and the quantizer of timed modules with `zipkd.latency.runtimes` (neither knows a quantizer), and loads the API
on first use."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from zipkd.latency.runtimes import register_quantizer
from zipkd.models.formats import register_format

RECIPE_KEY = "zipkd_quantization"  # the config.json key a quantized folder carries (its recipe)

_API = (
    "METHODS",
    "Method",
    "QuantizeConfig",
    "QuantizeResult",
    "available_methods",
    "quantize",
    "quantize_model",
    "load_quantized",
    "tensor_bytes",
)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module("zipkd.quantize.api"), name)
    raise AttributeError(f"module 'zipkd.quantize' has no attribute {name!r}")


def _load_quantized(folder: Path, dtype: Any, device: str) -> Any:
    return importlib.import_module("zipkd.quantize.api").load_quantized(folder, dtype, device)


register_format(RECIPE_KEY, _load_quantized)
register_quantizer(lambda: importlib.import_module("zipkd.quantize.api").quantize_model)

__all__ = ["RECIPE_KEY", *_API]
