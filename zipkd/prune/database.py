"""Per-layer pruning databases: for every level of the latency grid, which structures a block keeps and the error
that costs. One database serves every speedup target; the search picks one level per block.

Errors are the OBS loss tr(G ΔW H ΔWᵀ) of the block's output projection: H = 2/N Σ x xᵀ of its calibration
inputs, G = 1/N Σ g gᵀ of the per-token loss gradients w.r.t. the block's output (a Kronecker-factored Fisher,
as in K-FAC / LLM Surgeon). With G the error estimates the increase of the language-model loss, which makes
blocks in different layers comparable; with G = I it is the plain squared output error, which is not (the
residual stream grows by orders of magnitude through SmolLM2's layers)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from zipkd.prune.obs import Level


@dataclass
class BlockDatabase:
    """Levels of one attention (sizes = kept KV groups) or MLP (sizes = kept channels) block."""

    kind: str  # "attention" | "mlp"
    full: int  # size of the dense block
    levels: dict[int, Level]

    def __post_init__(self) -> None:
        if self.full not in self.levels:
            self.levels[self.full] = Level(self.full, torch.arange(self.full), 0.0)

    @property
    def sizes(self) -> list[int]:
        return sorted(self.levels)

    def error(self, size: int) -> float:
        return self.levels[size].error

    def keep(self, size: int) -> torch.Tensor:
        return self.levels[size].keep


@dataclass
class LayerDatabase:
    attention: BlockDatabase
    mlp: BlockDatabase
    joint: bool = False  # only "keep the layer" or "drop the whole layer" (ShortGPT)
    info: dict[str, float] = field(default_factory=dict)

    def options(self) -> list[tuple[int, int, float]]:
        """(kv_heads, width, error) choices for this layer."""
        a, m = self.attention, self.mlp
        if self.joint:
            return [(a.full, m.full, 0.0), (0, 0, a.error(0) + m.error(0))]
        return [(ka, km, a.error(ka) + m.error(km)) for ka in a.sizes for km in m.sizes]


@dataclass
class ModelDatabase:
    method: str
    layers: list[LayerDatabase]
    meta: dict[str, Any] = field(default_factory=dict)
    hessians: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # dense-input (H_attn, H_mlp), if kept


def attention_columns(group_size: int, head_dim: int) -> int:
    """o_proj input columns per KV group: the head_dim outputs of each of its query heads."""
    return group_size * head_dim


def expand_groups(keep: torch.Tensor, cols: int) -> torch.Tensor:
    """Input columns of the kept structures (`cols` columns each)."""
    return (keep[:, None] * cols + torch.arange(cols, device=keep.device)).reshape(-1)


def ranked_levels(order_desc: torch.Tensor, sizes: Sequence[int], error_of) -> dict[int, Level]:
    """Keep the top-`size` structures of a ranking (most important first) at each size; `error_of(keep)`."""
    out = {}
    for s in sizes:
        keep = order_desc[:s].sort().values.cpu()
        out[s] = Level(s, keep, float(error_of(keep)))
    return out
