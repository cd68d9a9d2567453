"""optimum-quanto back end: weight-only int8 (per output channel) and int4 (groups of 128 input columns, one
group per row when the width is not a multiple of the group) linears, quantized with `quantize` + `freeze`.

Saved with quanto's own state-dict layout (`weight._data`, `weight._scale`, int4 also `weight._shift`);
transformers cannot serialise quanto models, so these folders load only through zipkd (`requantize`)."""

from __future__ import annotations

import logging
import types
from typing import Any

import torch
from torch import nn

from zipkd.quantize.registry import Backend, Method, register

QTYPES = {"int8": "qint8", "int4": "qint4"}


def import_quanto() -> Any:
    quiet = logging.getLogger("optimum")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        # lazy: a heavy optional back end (3-4 s to import on top of torch); only its methods need it
        import optimum.quanto as quanto
    finally:
        quiet.setLevel(level)
    return quanto


def is_quantized_module(module: nn.Module) -> bool:
    return isinstance(module, import_quanto().QModuleMixin)


def _qtype(weights: str) -> Any:
    return getattr(import_quanto(), QTYPES[weights])


def _forward_outside_inference_mode(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """quanto's int4 weights fail under `torch.inference_mode` ("Cannot set version_counter for inference
    tensor"; zipkd's timing and perplexity run in it): compute such calls under `no_grad` instead."""
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False), torch.no_grad():
            return type(self).forward(self, x)
    return type(self).forward(self, x)


def _guard_inference_mode(root: nn.Module, names: list[str]) -> None:
    for n in names:
        module = root.get_submodule(n)
        # A bound method (not a closure), so deep copies of the model call their own module.
        module.forward = types.MethodType(_forward_outside_inference_mode, module)


def quantize_modules(root: nn.Module, names: list[str], weights: str) -> None:
    """Quantize the named `nn.Linear` submodules of `root` in place (weight-only) and freeze them."""
    quanto = import_quanto()
    quanto.quantize(root, weights=_qtype(weights), include=names)
    missing = [n for n in names if not isinstance(root.get_submodule(n), quanto.QModuleMixin)]
    if missing:  # pragma: no cover - quanto quantizes every nn.Linear it is pointed at
        raise RuntimeError(f"optimum-quanto did not quantize {missing[:3]}")
    quanto.freeze(root)
    _guard_inference_mode(root, names)


def load_modules(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    names: list[str],
    weights: str,
    device: torch.device,
) -> None:
    """Rebuild the named quanto linears of a freshly built (meta) model and load every weight from
    `state_dict` (quanto's `requantize`)."""
    quanto = import_quanto()
    qmap = {n: {"weights": QTYPES[weights], "activations": "none"} for n in names}
    quanto.requantize(model, state_dict, qmap, device=device)
    _guard_inference_mode(model, names)


def check(dev: str) -> str | None:
    """optimum-quanto runs wherever torch does; ImportError when it is not installed."""
    import_quanto()
    return None


def quantize_targets(model: nn.Module, targets: list[str], method: Method, device: torch.device) -> None:
    quantize_modules(model, targets, method.weights)


def load_targets(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    targets: list[str],
    method: Method,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[set[str], set[str]]:
    provided = set(state_dict)
    # Scales follow the compute dtype, as if the model had been quantized in it.
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    load_modules(model, sd, targets, method.weights, device)
    expected = set(model.state_dict())
    return expected - provided, provided - expected


register(
    Backend("optimum-quanto", check, quantize_targets, load_targets),
    Method(
        "quanto-int8",
        "optimum-quanto",
        "int8",
        8,
        ("cpu", "cuda"),
        "weight-only int8, one scale per output channel",
    ),
    Method(
        "quanto-int4",
        "optimum-quanto",
        "int4",
        4,
        ("cpu", "cuda"),
        "weight-only int4 with scale and shift per group of 128 inputs",
    ),
)
