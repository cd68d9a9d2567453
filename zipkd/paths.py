"""Where zipkd keeps its cache (converted embedded model, exported data, latency tables)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$ZIPKD_CACHE`, else `$XDG_CACHE_HOME/zipkd`, else `~/.cache/zipkd`."""
    if env := os.environ.get("ZIPKD_CACHE"):
        return Path(env).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return base / "zipkd"


def offline_env() -> None:
    """No hub access anywhere: zipkd never downloads weights or data."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
