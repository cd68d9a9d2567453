"""The pruning-method registry. A method is one module in this package that registers a `PruneMethod`: it
declares what the driver must collect for it (calibration activations, input Hessians, loss-gradient Fisher),
how the search treats it (free per-layer structures or one uniform structure), how surgery re-fits the kept
weights, and builds one layer's database from what the driver measured (`LayerStats`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from zipkd.errors import ZipkdError
from zipkd.models.adapters import ArchAdapter, Geometry
from zipkd.models.surgery import LayerShape
from zipkd.prune.database import BlockDatabase, LayerDatabase, attention_columns
from zipkd.prune.obs import Level

REFITS = ("sequential", "dense", "none")


@dataclass
class LayerStats:
    """One decoder layer as the driver hands it to a method: the layer, its levels on the latency grid and the
    statistics the method asked for (None where it did not). In an already pruned model (`PruneMethod.reprunes`)
    the layer has its own shape (`current`), a removed block has no Hessian and only the level 0."""

    index: int
    layer: nn.Module
    adapter: ArchAdapter
    geometry: Geometry
    attention_sizes: list[int]  # kept KV-group counts to build levels for
    mlp_sizes: list[int]  # kept MLP widths to build levels for
    damp: float
    mlp_chunk: int = 1
    hessians: tuple[torch.Tensor, torch.Tensor] | None = None  # float32 H of the o_proj / down_proj inputs
    fisher: tuple[torch.Tensor, torch.Tensor] | None = None  # (G_attn, G_mlp) output-side error weights
    block_influence: float | None = None  # ShortGPT's 1 − cos(input, output), mean over calibration tokens
    current: LayerShape | None = None  # the layer's own (KV groups, width); None: the base geometry's

    @property
    def shape(self) -> LayerShape:
        """The layer's (KV groups, MLP width) as it is now: the base geometry's in an unpruned model."""
        geo = self.geometry
        return self.current or LayerShape(geo.num_kv_heads, geo.intermediate_size)

    def removed(self, block: str) -> bool:
        """Is the attention (`"attention"`) or MLP block already removed from this layer?"""
        return (self.shape.kv_heads if block == "attention" else self.shape.intermediate) == 0

    @staticmethod
    def removed_block(block: str) -> BlockDatabase:
        """The database of a block that is gone already: one level, size 0, no error."""
        return BlockDatabase(block, 0, {0: Level(0, torch.zeros(0, dtype=torch.long), 0.0)})

    @property
    def columns(self) -> int:
        """o_proj input columns per KV group."""
        return attention_columns(self.geometry.group_size, self.geometry.head_dim)

    def linear(self, block: str, name: str) -> nn.Linear:
        """A projection of the attention (`block="attention"`) or MLP block, by its adapter role (q, k, v, o,
        gate, up, down)."""
        ad = self.adapter
        owner = ad.attention(self.layer) if block == "attention" else ad.mlp_block(self.layer)
        return getattr(owner, getattr(ad, name))

    def weight(self, block: str, name: str) -> torch.Tensor:
        """The weight rows of a projection role, read out of a fused projection (Phi-3) where there is one."""
        ad, geo = self.adapter, self.geometry
        owner = ad.attention(self.layer) if block == "attention" else ad.mlp_block(self.layer)
        n_kv = self.shape.kv_heads
        if ad.qkv and block == "attention":
            n_kv = getattr(owner, ad.o).in_features // (geo.group_size * geo.head_dim)
        return ad.projection_weight(owner, name, n_kv, geo.group_size, geo.head_dim).detach()


class PruneMethod:
    """What a pruning method declares and builds. Subclasses set the class attributes and `layer_database`."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for help texts
    needs_calibration: ClassVar[bool] = True  # calibration activations flow through the layers
    needs_hessians: ClassVar[bool] = False  # float32 Hessians of the o_proj / down_proj inputs
    uses_fisher: ClassVar[bool] = False  # loss-gradient Fisher weighting of the errors (`fisher_samples`)
    uniform: ClassVar[bool] = False  # every layer gets one structure (uniform search) instead of the DP
    whole_layers: ClassVar[bool] = False  # a layer is kept whole or dropped whole (joint layer databases)
    # can prune an already pruned model further (its layers' own shapes, removed blocks as level 0): the ZipLM
    # family schedule, prune → recover → prune again
    reprunes: ClassVar[bool] = False

    def refit(self, sequential: bool) -> str:
        """How surgery updates the kept weights: "sequential" (least squares on inputs through the already
        pruned layers), "dense" (from the dense-input Hessians the database kept) or "none" (slice only)."""
        return "none"

    def layer_database(self, stats: LayerStats) -> LayerDatabase:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<pruning method {self.name}>"


METHODS: dict[str, PruneMethod] = {}


def register(cls: type[PruneMethod]) -> type[PruneMethod]:
    """Class decorator: add one instance of a method to `METHODS` under its name."""
    if cls.name in METHODS:
        raise ValueError(f"pruning method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls()
    return cls


def get_method(name: str | PruneMethod) -> PruneMethod:
    if isinstance(name, PruneMethod):
        return name
    try:
        return METHODS[name]
    except (KeyError, TypeError):
        raise ZipkdError(f"unknown pruning method {name!r}; choose one of {', '.join(METHODS)}") from None


def method_help() -> str:
    """`name (summary)` of every method, for help texts."""
    return "; ".join(f"{m.name} ({m.summary})" for m in METHODS.values())


def describe(method: Any) -> dict[str, Any]:
    """What a method declares, for manifests and tests."""
    m = get_method(method)
    return {
        "name": m.name,
        "needs_calibration": m.needs_calibration,
        "needs_hessians": m.needs_hessians,
        "uses_fisher": m.uses_fisher,
        "uniform": m.uniform,
        "reprunes": m.reprunes,
    }
