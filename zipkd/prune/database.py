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

from zipkd.prune import obs
from zipkd.prune.obs import Level

METHODS = ("zipkd", "magnitude", "shortgpt", "wanda-sp")


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


def structure_scores(W: torch.Tensor, H: torch.Tensor, cols_per_structure: int) -> torch.Tensor:
    """Wanda-sp / FLAP-like activation-weighted scores: Σ_i |W_ij|·‖x_j‖ summed over each structure's columns
    (‖x_j‖ ∝ sqrt(H_jj))."""
    norms = H.diagonal().clamp_min(0).sqrt()
    col = (W.abs().float() * norms).sum(0)
    return col.view(-1, cols_per_structure).sum(1)


def ranked_levels(order_desc: torch.Tensor, sizes: Sequence[int], error_of) -> dict[int, Level]:
    """Keep the top-`size` structures of a ranking (most important first) at each size; `error_of(keep)`."""
    out = {}
    for s in sizes:
        keep = order_desc[:s].sort().values.cpu()
        out[s] = Level(s, keep, float(error_of(keep)))
    return out


def _expand(keep: torch.Tensor, cols: int) -> torch.Tensor:
    return (keep[:, None] * cols + torch.arange(cols)).reshape(-1)


def block_database(
    method: str,
    kind: str,
    W: torch.Tensor,
    H: torch.Tensor | None,
    cols: int,
    sizes: Sequence[int],
    damp: float,
    chunk: int = 1,
    scores: torch.Tensor | None = None,
    G: torch.Tensor | None = None,
) -> BlockDatabase:
    """Database of one block. `W`: the output projection (d_out × n), `H`: its float32 input Hessian, `cols`:
    columns per structure (head_dim·group_size for attention, 1 for MLP), `G`: output-side weighting of the
    errors (the Fisher of the loss w.r.t. the block output; None = identity)."""
    full = W.shape[1] // cols
    W = W.float()
    if method == "zipkd":
        if cols == 1:
            levels = obs.obs_prune_columns(W, H, sizes, damp, chunk, G)
        else:
            levels = obs.obs_prune_groups(W, H, cols, sizes, damp, G)
        return BlockDatabase(kind, full, levels)
    if method == "wanda-sp":
        s = structure_scores(W, H, cols) if scores is None else scores
        order = torch.argsort(s.cpu(), descending=True, stable=True)
        Hd = obs.damp_hessian(H, damp)

        def err(keep: torch.Tensor) -> float:
            return obs.output_error(W, Hd, _expand(keep, cols).to(W.device), G)

        return BlockDatabase(kind, full, ranked_levels(order, sizes, err))
    if method == "magnitude":
        if scores is None:
            raise ValueError("magnitude pruning needs structure scores")
        order = torch.argsort(scores.cpu(), descending=True, stable=True)
        return BlockDatabase(kind, full, ranked_levels(order, sizes, lambda keep: float("nan")))
    raise ValueError(f"unknown method {method!r}")
