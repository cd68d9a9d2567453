"""What a model's manifest chain says about it: its base model, the regime of its latency table, and the
speedup the pruner predicted. Each stage's `zipkd.json` names its input model (role "model"); following those
links from a compressed model leads back to the dense model it came from."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from zipkd.latency.table import Regime
from zipkd.manifest import read_manifest

MAX_DEPTH = 32


def chain(path: str | os.PathLike | None) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(folder, manifest) from the model back through its input models, while folders and manifests exist."""
    seen: set[Path] = set()
    current = Path(path) if path is not None else None
    while current is not None and current.is_dir() and len(seen) < MAX_DEPTH:
        current = current.resolve()
        if current in seen:
            return
        seen.add(current)
        manifest = read_manifest(current)
        if manifest is None:
            return
        yield current, manifest
        current = parent_model(manifest)


def parent_model(manifest: dict[str, Any]) -> Path | None:
    """The model folder a stage read (input role "model"), if it still exists."""
    for entry in manifest.get("inputs", []) or []:
        if entry.get("role") == "model" and entry.get("path"):
            p = Path(entry["path"]).expanduser()
            if p.is_dir() and (p / "config.json").is_file():
                return p
    return None


def base_model(path: str | os.PathLike | None) -> Path | None:
    """The first model of the chain (the dense model it was compressed from); None for a model with no
    recorded parent."""
    links = list(chain(path))
    if not links:
        return None
    root = links[-1][0]
    last_parent = parent_model(links[-1][1])
    if last_parent is not None:  # the chain continues into a folder without a manifest
        root = last_parent.resolve()
    return None if root == Path(path).resolve() else root


def _is_regime(d: Any) -> bool:
    return isinstance(d, dict) and d.get("regime") in ("prefill", "decode") and "device" in d


def _find_regimes(obj: Any, where: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(obj, dict):
        for k, v in obj.items():
            here = f"{where}.{k}" if where else str(k)
            if k == "regime" and _is_regime(v):
                yield here, v
            else:
                yield from _find_regimes(v, here)


def recorded_regime(path: str | os.PathLike | None) -> tuple[Regime, str] | None:
    """The regime a model was compressed for: its latency table's regime (`prune.table.regime`) anywhere in the
    chain, else any other recorded regime (e.g. where quantization was timed). Returns (regime, source)."""
    fallback = None
    for folder, manifest in chain(path):
        table = (manifest.get("prune") or {}).get("table") or {}
        if _is_regime(table.get("regime")):
            return _regime(table["regime"]), f"{folder.name}/zipkd.json: prune.table.regime"
        if fallback is None:
            for where, found in _find_regimes(manifest):
                fallback = (_regime(found), f"{folder.name}/zipkd.json: {where}")
                break
    return fallback


def _regime(d: dict[str, Any]) -> Regime:
    fields = Regime.__dataclass_fields__
    return Regime(**{k: v for k, v in d.items() if k in fields})


def predicted_speedup(path: str | os.PathLike | None) -> tuple[float, str] | None:
    """The speedup predicted from the latency table when the model (or an ancestor) was pruned."""
    for folder, manifest in chain(path):
        value = (manifest.get("metrics") or {}).get("predicted_speedup")
        if isinstance(value, (int, float)):
            return float(value), f"{folder.name} ({manifest.get('stage', '?')})"
    return None
