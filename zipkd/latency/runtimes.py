"""The runtimes a latency table can be measured in, keyed by name: adding one is an entry here plus a module
that implements `check_regime(regime)`, `fingerprint(regime)`, `profile(lm, regime, progress, repeats)` and
`validate(lm, table, n, seed, repeats, progress)` (torch runtimes share `zipkd.latency.profile`).

Torch runtimes time a regime's `quantization` (a zipkd quantize method) on modules quantized in memory by the
quantizer that `zipkd.quantize` registers here (`register_quantizer`): the latency layer never imports it."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from zipkd.errors import ZipkdError


@dataclass(frozen=True)
class Runtime:
    name: str
    description: str
    devices: tuple[str, ...]
    torch: bool  # runs torch modules; `quantization` is then a zipkd quantize method, else the engine's type
    module: str | None = None  # the implementation for non-torch runtimes

    def impl(self) -> ModuleType:
        if self.module is None:
            raise ZipkdError(f"runtime {self.name} is measured by zipkd.latency.profile")
        return importlib.import_module(self.module)


RUNTIMES: dict[str, Runtime] = {
    "eager": Runtime("eager", "PyTorch eager", ("cpu", "cuda"), torch=True),
    "cudagraphs": Runtime("cudagraphs", "PyTorch with CUDA graphs (CUDA only)", ("cuda",), torch=True),
    "llama.cpp": Runtime(
        "llama.cpp",
        "llama.cpp through llama-cpp-python, GGUF at --quantization (CPU)",
        ("cpu",),
        torch=False,
        module="zipkd.latency.llamacpp",
    ),
}


def runtime_for(name: str) -> Runtime:
    if name not in RUNTIMES:
        raise ZipkdError(f"unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    return RUNTIMES[name]


# (module, method, device) -> the module quantized in place (see `zipkd.quantize.quantize_model`)
ModuleQuantizer = Callable[[Any, str, str], Any]
# "torch" -> a loader of the torch runtimes' quantizer
_QUANTIZER: dict[str, Callable[[], ModuleQuantizer]] = {}


def register_quantizer(get: Callable[[], ModuleQuantizer]) -> None:
    """Let the torch runtimes time quantized modules: `get()` returns the quantizer (a loader, so that
    registering imports nothing heavy)."""
    _QUANTIZER["torch"] = get


def module_quantizer(method: str | None) -> ModuleQuantizer | None:
    """The quantizer the torch runtimes apply for a regime's `quantization` method (None: none asked for)."""
    if method is None:
        return None
    get = _QUANTIZER.get("torch")
    try:
        if get is None:
            raise ImportError("zipkd.quantize registered no quantizer")
        return get()
    except ImportError as exc:
        raise ZipkdError(
            f"--quantization {method} needs zipkd.quantize, which is not available here ({exc})"
        ) from exc
