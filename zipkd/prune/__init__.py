"""ZipLM-style structured pruning to a measured speedup target: structured OBS per layer (obs.py, pure maths),
per-layer databases on the latency grid (database.py), a DP knapsack search (search.py), the calibration and
surgery driver (driver.py), baselines in the same code path (baselines.py) and the API (api.py)."""

from zipkd.prune.api import PruneConfig, PruneResult, prune, save_pruned, target_label
from zipkd.prune.database import METHODS

__all__ = ["METHODS", "PruneConfig", "PruneResult", "prune", "save_pruned", "target_label"]
