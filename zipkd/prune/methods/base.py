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
from zipkd.prune.database import LayerDatabase, attention_columns

REFITS = ("sequential", "dense", "none")


@dataclass
class LayerStats:
    """One dense decoder layer as the driver hands it to a method: the layer, its levels on the latency grid and
    the statistics the method asked for (None where it did not)."""

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
        n_kv = geo.num_kv_heads
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
    }
