"""The `zipkd.json` manifest written into every output: stage, inputs with content hashes, resolved config,
seed, package versions, hardware fingerprint and metrics. A chain of output folders is the audit trail."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

MANIFEST = "zipkd.json"
SCHEMA_VERSION = 1
_PACKAGES = (
    "zipkd",
    "torch",
    "transformers",
    "accelerate",
    "safetensors",
    "lm_eval",
    "peft",
    "bitsandbytes",
    "optimum-quanto",
    "datasets",
)
_HASH_SUFFIXES = (".safetensors", ".json", ".gguf", ".model", ".txt", ".jsonl", ".parquet", ".bin")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def content_hash(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a folder's relevant files (names and contents, sorted; the manifest excluded)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path)
        # Hidden entries *inside* the folder (work dirs, temp files) are skipped; the folder itself may well live
        # under a hidden directory (~/.cache/zipkd/models/...).
        if f.name == MANIFEST or f.suffix not in _HASH_SUFFIXES or any(s.startswith(".") for s in rel.parts):
            continue
        h.update(str(rel).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware_fingerprint() -> dict[str, Any]:
    """What the numbers were measured on: CPU model and threads, GPU and driver when present."""
    hw: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        hw["gpu"] = torch.cuda.get_device_name(0)
        hw["cuda"] = torch.version.cuda
        try:
            hw["driver"] = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
        except Exception:  # noqa: BLE001 - fingerprint is best effort
            hw["driver"] = None
    return hw


def set_seed(seed: int | None) -> int:
    """Seed python, numpy and torch; return the seed actually used (drawn when None)."""
    if seed is None:
        seed = random.SystemRandom().randrange(2**31)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return seed


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and obj != obj:  # NaN is not valid JSON
        return None
    return obj


def build_manifest(
    stage: str,
    inputs: dict[str, str | os.PathLike] | None = None,
    config: Any = None,
    seed: int | None = None,
    metrics: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    input_hashes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A manifest dict; `inputs` maps a role ("model", "teacher", "calib") to a path that is hashed."""
    ins = []
    for role, p in (inputs or {}).items():
        if p is None:
            continue
        entry: dict[str, Any] = {"role": role, "path": str(p)}
        if input_hashes and role in input_hashes:
            entry["sha256"] = input_hashes[role]
        elif Path(p).exists():
            entry["sha256"] = content_hash(p)
        ins.append(entry)
    data = {
        "schema_version": SCHEMA_VERSION,
        "stage": stage,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": ins,
        "config": _jsonable(config) if config is not None else {},
        "seed": seed,
        "versions": package_versions(),
        "hardware": hardware_fingerprint(),
        "metrics": _jsonable(metrics or {}),
    }
    if extra:
        data.update(_jsonable(extra))
    return data


def write_manifest(folder: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST
    path.write_text(json.dumps(_jsonable(manifest), indent=2, sort_keys=False) + "\n")
    return path


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
