"""shortgpt: whole layers dropped by block influence BI = 1 − cos(input, output) of the layer, averaged over
calibration tokens (Men et al. 2024, "ShortGPT")."""

from __future__ import annotations

import torch

from zipkd.prune.database import BlockDatabase, LayerDatabase
from zipkd.prune.methods.base import LayerStats, PruneMethod, register
from zipkd.prune.obs import Level


@register
class ShortGPT(PruneMethod):
    name = "shortgpt"
    summary = "drop layers by block influence"
    whole_layers = True

    def layer_database(self, stats: LayerStats) -> LayerDatabase:
        geo = stats.geometry
        none = torch.zeros(0, dtype=torch.long)
        return LayerDatabase(
            BlockDatabase("attention", geo.num_kv_heads, {0: Level(0, none, stats.block_influence)}),
            BlockDatabase("mlp", geo.intermediate_size, {0: Level(0, none.clone(), 0.0)}),
            joint=True,
        )
