"""Folder formats that a higher layer defines (a quantized model: `zipkd.quantize`): a folder is marked by a
config.json key and read by the loader that layer registers here. `zipkd.models.io.load_model` dispatches on
them without knowing any; this module stays free of torch so that registering costs nothing at `import zipkd`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

# config.json key marking a folder format -> its loader(folder, torch dtype, device) -> model
FolderLoader = Callable[[Path, Any, str], Any]
FORMATS: dict[str, FolderLoader] = {}


def register_format(config_key: str, loader: FolderLoader) -> None:
    """Read folders whose config.json has `config_key` with `loader` (e.g. `zipkd_quantization`, registered by
    `zipkd.quantize`)."""
    FORMATS[config_key] = loader


def folder_loader(config: dict[str, Any]) -> FolderLoader | None:
    """The registered loader of a folder with this config.json, or None for a plain model folder."""
    return next((loader for key, loader in FORMATS.items() if config.get(key)), None)


def folder_format(config: dict[str, Any]) -> str | None:
    """The config.json key of the registered format this folder is in (e.g. `zipkd_quantization`), or None."""
    return next((key for key in FORMATS if config.get(key)), None)
