"""The runtimes a latency table can be measured in, keyed by name: adding one is an entry here plus a module
that implements `check_regime(regime)`, `fingerprint(regime)`, `profile(lm, regime, progress, repeats)` and
`validate(lm, table, n, seed, repeats, progress)` (torch runtimes share `zipkd.latency.profile`)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

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
