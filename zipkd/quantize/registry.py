"""The quantizer registry: a back end (one module: `bnb.py`, `quanto.py`) registers itself with the methods it
provides; `api.py` dispatches on the method's back end instead of testing library names."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Method:
    """One quantization method: which library, which weight format, on which device types it runs."""

    name: str
    backend: str  # "bitsandbytes" or "optimum-quanto"
    weights: str  # int8 | nf4 | fp4 | int4
    bits: int
    devices: tuple[str, ...]
    summary: str


@dataclass(frozen=True)
class Backend:
    """A quantization library behind zipkd's methods.

    `check()` imports the library and raises ImportError when it (or its kernels for `device_type`) is missing;
    `quantize(model, targets, method, device)` swaps the named `nn.Linear`s of `model` in place;
    `load(model, state_dict, targets, method, dtype, device)` rebuilds them in a meta-device model from saved
    tensors, loads the rest and returns the (missing, unexpected) keys."""

    name: str
    check: Callable[[str], str | None]
    quantize: Callable[..., None]
    load: Callable[..., tuple[set[str], set[str]]]


BACKENDS: dict[str, Backend] = {}
METHODS: dict[str, Method] = {}


def register(backend: Backend, *methods: Method) -> None:
    for m in methods:
        if m.backend != backend.name or m.name in METHODS:
            raise ValueError(f"quantization method {m.name!r} is registered twice or for another back end")
    BACKENDS[backend.name] = backend
    METHODS.update({m.name: m for m in methods})


def owner_of(model: Any, name: str) -> tuple[Any, str]:
    """The parent module of a dotted submodule name, and the child's attribute name."""
    parent, _, child = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), child
