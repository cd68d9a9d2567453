"""Quantization back ends (bitsandbytes, optimum-quanto) behind one API: see `zipkd.quantize.api`."""

from __future__ import annotations

import importlib

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


__all__ = list(_API)
