"""zipkd: structured OBS (ZipLM, Kurtic et al. 2023). Per block, KV groups / MLP channels are removed with the
optimal-brain-surgeon update of the remaining columns, errors weighted by the loss-gradient Fisher; surgery
re-fits the kept columns on inputs through the already-pruned layers."""

from __future__ import annotations

from zipkd.prune import obs
from zipkd.prune.database import BlockDatabase, LayerDatabase
from zipkd.prune.methods.base import LayerStats, PruneMethod, register


@register
class ZipLM(PruneMethod):
    name = "zipkd"
    summary = "structured OBS + DP search"
    needs_hessians = True
    uses_fisher = True
    reprunes = True

    def refit(self, sequential: bool) -> str:
        return "sequential" if sequential else "dense"

    def layer_database(self, stats: LayerStats) -> LayerDatabase:
        H_attn, H_mlp = stats.hessians
        G_attn, G_mlp = stats.fisher or (None, None)
        cols = stats.columns
        if stats.removed("attention"):
            attention = stats.removed_block("attention")
        else:
            W_o = stats.weight("attention", "o").float()
            levels = obs.obs_prune_groups(W_o, H_attn, cols, stats.attention_sizes, stats.damp, G_attn)
            attention = BlockDatabase("attention", W_o.shape[1] // cols, levels)
        if stats.removed("mlp"):
            mlp = stats.removed_block("mlp")
        else:
            W_d = stats.weight("mlp", "down").float()
            levels = obs.obs_prune_columns(W_d, H_mlp, stats.mlp_sizes, stats.damp, stats.mlp_chunk, G_mlp)
            mlp = BlockDatabase("mlp", W_d.shape[1], levels)
        return LayerDatabase(attention, mlp)
