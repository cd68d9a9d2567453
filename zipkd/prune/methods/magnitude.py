"""magnitude: uniform width pruning (every layer keeps the same KV-group count and MLP width), structures
ranked by the L2 norm of all their weights. Needs no calibration data."""

from __future__ import annotations

import torch

from zipkd.prune.baselines import channel_magnitude, kv_group_magnitude
from zipkd.prune.database import BlockDatabase, LayerDatabase, ranked_levels
from zipkd.prune.methods.base import LayerStats, PruneMethod, register


def _block(kind: str, full: int, scores: torch.Tensor, sizes: list[int]) -> BlockDatabase:
    order = torch.argsort(scores.cpu(), descending=True, stable=True)
    return BlockDatabase(kind, full, ranked_levels(order, sizes, lambda keep: float("nan")))


@register
class Magnitude(PruneMethod):
    name = "magnitude"
    summary = "uniform width by weight norm"
    needs_calibration = False
    uniform = True

    def layer_database(self, stats: LayerStats) -> LayerDatabase:
        geo = stats.geometry
        w = stats.weight
        a_scores = kv_group_magnitude(
            w("attention", "q"),
            w("attention", "k"),
            w("attention", "v"),
            w("attention", "o"),
            geo.head_dim,
            geo.group_size,
        )
        m_scores = channel_magnitude(w("mlp", "gate"), w("mlp", "up"), w("mlp", "down"))
        return LayerDatabase(
            _block(
                "attention", w("attention", "o").shape[1] // stats.columns, a_scores, stats.attention_sizes
            ),
            _block("mlp", w("mlp", "down").shape[1], m_scores, stats.mlp_sizes),
        )
