"""ZipLM-style structured pruning to a measured speedup target: structured OBS per layer (obs.py, pure maths),
per-layer databases on the latency grid (database.py), the methods as plugins (methods/: zipkd and the
baselines, each declaring what it needs), a DP knapsack search (search.py), the calibration and surgery driver
(driver.py) and the API (api.py).

The package itself stays free of torch (its names load on first use) so that the CLI can parse speedup targets
with `zipkd.prune.speedup` while `zipkd --help` stays instant."""

from __future__ import annotations

import importlib

_LAZY = {
    "PruneConfig": "zipkd.prune.api",
    "PruneResult": "zipkd.prune.api",
    "prune": "zipkd.prune.api",
    "prune_model": "zipkd.prune.api",
    "save_pruned": "zipkd.prune.api",
    "target_label": "zipkd.prune.api",
    "METHODS": "zipkd.prune.methods",
    "PruneMethod": "zipkd.prune.methods",
    "get_method": "zipkd.prune.methods",
    "parse_speedup": "zipkd.prune.speedup",
    "parse_speedups": "zipkd.prune.speedup",
}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'zipkd.prune' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = list(_LAZY)
