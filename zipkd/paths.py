"""Where zipkd keeps its cache (converted embedded model, exported data, latency tables), and reading user
text files safely."""

from __future__ import annotations

import os
from pathlib import Path

from zipkd.errors import ZipkdError


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


def read_text_file(path: Path, what: str) -> str:
    """A UTF-8 text file's content; a binary or undecodable file is one clear error."""
    data = path.read_bytes()
    if b"\0" in data[:65536]:
        raise ZipkdError(f"{what} {path} is a binary file, not text")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ZipkdError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
