"""wanda-sp: structures ranked by Σ|W|·‖x‖ of the output projection's columns (Wanda-sp / FLAP-like, An et al.
2024), no weight update; the search's errors are the true output errors of the kept structures."""

from __future__ import annotations

import torch

from zipkd.prune import obs
from zipkd.prune.baselines import structure_scores
from zipkd.prune.database import BlockDatabase, LayerDatabase, expand_groups, ranked_levels
from zipkd.prune.methods.base import LayerStats, PruneMethod, register


def _block(kind, W, H, cols, sizes, damp, G) -> BlockDatabase:
    order = torch.argsort(structure_scores(W, H, cols).cpu(), descending=True, stable=True)
    Hd = obs.damp_hessian(H, damp)

    def err(keep: torch.Tensor) -> float:
        return obs.output_error(W, Hd, expand_groups(keep, cols).to(W.device), G)

    return BlockDatabase(kind, W.shape[1] // cols, ranked_levels(order, sizes, err))


@register
class WandaSP(PruneMethod):
    name = "wanda-sp"
    summary = "|W|·‖x‖ scores, no weight update"
    needs_hessians = True
    uses_fisher = True
    reprunes = True

    def layer_database(self, stats: LayerStats) -> LayerDatabase:
        H_attn, H_mlp = stats.hessians
        G_attn, G_mlp = stats.fisher or (None, None)
        attention = (
            stats.removed_block("attention")
            if stats.removed("attention")
            else _block(
                "attention",
                stats.weight("attention", "o").float(),
                H_attn,
                stats.columns,
                stats.attention_sizes,
                stats.damp,
                G_attn,
            )
        )
        mlp = (
            stats.removed_block("mlp")
            if stats.removed("mlp")
            else _block(
                "mlp", stats.weight("mlp", "down").float(), H_mlp, 1, stats.mlp_sizes, stats.damp, G_mlp
            )
        )
        return LayerDatabase(attention, mlp)
