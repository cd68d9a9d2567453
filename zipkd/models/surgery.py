"""Structural surgery: slice attention KV groups and MLP channels, remove blocks, drop layers, and keep the
config's per-layer shapes (`zipkd_layers`) in step so the model saves and reloads.

A removed attention or MLP block becomes a `ZeroBlock` (its pre-norm becomes `Identity`), so the residual
stream passes through unchanged; a layer with both removed is dropped. Attention modules are renumbered
compactly (`layer_idx`), since the KV cache is indexed by it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from zipkd.errors import ZipkdError
from zipkd.models.adapters import ArchAdapter, adapter_for, geometry


@dataclass(frozen=True)
class LayerShape:
    """Shape of one decoder layer: kept KV heads (0 = attention removed) and MLP width (0 = MLP removed)."""

    kv_heads: int
    intermediate: int

    def heads(self, group_size: int) -> int:
        return self.kv_heads * group_size

    @property
    def empty(self) -> bool:
        return self.kv_heads == 0 and self.intermediate == 0


class ZeroBlock(nn.Module):
    """A removed attention or MLP block: contributes nothing to the residual stream."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.layer_idx: int | None = None

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        if hidden_states is None:
            hidden_states = kwargs.get("x", args[0] if args else None)
        out = torch.zeros_like(hidden_states)
        return (out, None) if self.kind == "attention" else out

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, removed"


def _slice_linear(
    lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None
) -> nn.Linear:
    w = lin.weight.data
    b = lin.bias.data if lin.bias is not None else None
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
        b = b.index_select(0, rows.to(w.device)) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b)
    new.weight.requires_grad_(lin.weight.requires_grad)
    return new


def attention_removed(layer: nn.Module, ad: ArchAdapter) -> bool:
    return isinstance(ad.attention(layer), ZeroBlock)


def mlp_removed(layer: nn.Module, ad: ArchAdapter) -> bool:
    return isinstance(ad.mlp_block(layer), ZeroBlock)


def remove_attention(layer: nn.Module, ad: ArchAdapter) -> None:
    setattr(layer, ad.attn, ZeroBlock("attention"))
    setattr(layer, ad.attn_norm, nn.Identity())


def remove_mlp(layer: nn.Module, ad: ArchAdapter) -> None:
    setattr(layer, ad.mlp, ZeroBlock("mlp"))
    setattr(layer, ad.mlp_norm, nn.Identity())


def kv_heads_of(layer: nn.Module, ad: ArchAdapter, head_dim: int) -> int:
    attn = ad.attention(layer)
    return 0 if isinstance(attn, ZeroBlock) else getattr(attn, ad.k).out_features // head_dim


def width_of(layer: nn.Module, ad: ArchAdapter) -> int:
    mlp = ad.mlp_block(layer)
    return 0 if isinstance(mlp, ZeroBlock) else getattr(mlp, ad.down).in_features


def slice_attention(
    layer: nn.Module, ad: ArchAdapter, head_dim: int, group_size: int, keep_groups: Sequence[int]
) -> None:
    """Keep the given KV groups (indices into the layer's current groups); a KV head goes with its
    `group_size` query heads. An empty selection removes the attention block."""
    if len(keep_groups) == 0:
        remove_attention(layer, ad)
        return
    attn = ad.attention(layer)
    n_groups = kv_heads_of(layer, ad, head_dim)
    groups = torch.as_tensor(sorted(keep_groups), dtype=torch.long)
    if groups.min() < 0 or groups.max() >= n_groups or len(set(groups.tolist())) != len(groups):
        raise ValueError(f"invalid KV groups {keep_groups} for a layer with {n_groups}")
    kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    q_heads = (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)
    q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    setattr(attn, ad.q, _slice_linear(getattr(attn, ad.q), rows=q_rows))
    setattr(attn, ad.k, _slice_linear(getattr(attn, ad.k), rows=kv_rows))
    setattr(attn, ad.v, _slice_linear(getattr(attn, ad.v), rows=kv_rows))
    setattr(attn, ad.o, _slice_linear(getattr(attn, ad.o), cols=q_rows))


def slice_mlp(layer: nn.Module, ad: ArchAdapter, keep_channels: Sequence[int] | torch.Tensor) -> None:
    """Keep the given MLP channels (rows of gate/up, columns of down); empty removes the MLP block."""
    keep = torch.as_tensor(keep_channels, dtype=torch.long).sort().values
    if keep.numel() == 0:
        remove_mlp(layer, ad)
        return
    mlp = ad.mlp_block(layer)
    setattr(mlp, ad.gate, _slice_linear(getattr(mlp, ad.gate), rows=keep))
    setattr(mlp, ad.up, _slice_linear(getattr(mlp, ad.up), rows=keep))
    setattr(mlp, ad.down, _slice_linear(getattr(mlp, ad.down), cols=keep))


def base_geometry(config: Any):
    """Geometry of the unpruned architecture (zipkd keeps it under `zipkd_base`)."""
    base = getattr(config, "zipkd_base", None)
    geo = geometry(config)
    if base:
        geo = type(geo)(**{**asdict(geo), **base})
    return geo


def pruned_in_config(config: dict[str, Any]) -> bool:
    """From a saved config.json alone: does the model keep fewer layers, KV heads or MLP channels than its base?"""
    base, layers = config.get("zipkd_base"), config.get("zipkd_layers")
    if not base or not layers:
        return False
    return len(layers) != base.get("num_layers", len(layers)) or any(
        lay.get("kv_heads") != base.get("num_kv_heads")
        or lay.get("intermediate") != base.get("intermediate_size")
        for lay in layers
    )


def layer_shapes(model: nn.Module) -> list[LayerShape]:
    ad = adapter_for(model.config)
    geo = base_geometry(model.config)
    return [
        LayerShape(kv_heads_of(layer, ad, geo.head_dim), width_of(layer, ad)) for layer in ad.layers(model)
    ]


def sync_config(model: nn.Module) -> None:
    """Drop empty layers, renumber attention `layer_idx` compactly and write per-layer shapes to the config.

    Uniform results (every layer with the same heads and width, no removed blocks) also get the standard
    fields, so stock `AutoModelForCausalLM.from_pretrained` loads them."""
    cfg = model.config
    ad = adapter_for(cfg)
    geo = base_geometry(cfg)
    if not getattr(cfg, "zipkd_base", None):
        cfg.zipkd_base = {
            "num_heads": geo.num_heads,
            "num_kv_heads": geo.num_kv_heads,
            "head_dim": geo.head_dim,
            "intermediate_size": geo.intermediate_size,
            "num_layers": geo.num_layers,
        }
    layers = ad.layers(model)
    old_types = list(getattr(cfg, "layer_types", None) or [])
    kept, kept_types = [], []
    for i, layer in enumerate(layers):
        shape = LayerShape(kv_heads_of(layer, ad, geo.head_dim), width_of(layer, ad))
        if shape.empty:
            continue
        kept.append(layer)
        if old_types:
            kept_types.append(old_types[i] if i < len(old_types) else old_types[-1])
    if not kept:
        raise ZipkdError("every decoder layer was removed; nothing would be left of the model")
    if len(kept) != len(layers):
        ad.set_layers(model, nn.ModuleList(kept))
    # Compact KV-cache indices over the layers that still have attention.
    attn_types, rest_types, idx = [], [], 0
    for j, layer in enumerate(kept):
        attn = ad.attention(layer)
        if isinstance(attn, ZeroBlock):
            rest_types.append(kept_types[j] if kept_types else None)
            continue
        attn.layer_idx = idx
        idx += 1
        attn_types.append(kept_types[j] if kept_types else None)
    if kept_types:
        if len(set(kept_types)) > 1 and rest_types:
            raise ZipkdError(
                "removing attention blocks in a model with mixed attention types is not supported"
            )
        cfg.layer_types = attn_types + rest_types
    cfg.num_hidden_layers = len(kept)
    shapes = [LayerShape(kv_heads_of(lay, ad, geo.head_dim), width_of(lay, ad)) for lay in kept]
    cfg.zipkd_layers = [asdict(s) for s in shapes]
    cfg.head_dim = geo.head_dim
    uniform = (
        len({(s.kv_heads, s.intermediate) for s in shapes}) == 1
        and shapes[0].kv_heads > 0
        and shapes[0].intermediate > 0
    )
    if uniform:
        cfg.num_key_value_heads = shapes[0].kv_heads
        cfg.num_attention_heads = shapes[0].kv_heads * geo.group_size
        cfg.intermediate_size = shapes[0].intermediate
    else:
        # Keep the base fields: the zipkd loader resizes each layer from `zipkd_layers`.
        cfg.num_key_value_heads = geo.num_kv_heads
        cfg.num_attention_heads = geo.num_heads
        cfg.intermediate_size = geo.intermediate_size
    for layer in kept:
        attn = ad.attention(layer)
        if not isinstance(attn, ZeroBlock) and hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = geo.group_size


def drop_layers(model: nn.Module, drop: Sequence[int]) -> None:
    """Remove whole decoder layers (indices into the current layers)."""
    ad = adapter_for(model.config)
    for i in drop:
        layer = ad.layers(model)[i]
        remove_attention(layer, ad)
        remove_mlp(layer, ad)
    sync_config(model)


def is_heterogeneous(config: Any) -> bool:
    shapes = getattr(config, "zipkd_layers", None)
    if not shapes:
        return False
    return len({(s["kv_heads"], s["intermediate"]) for s in shapes}) > 1 or any(
        s["kv_heads"] == 0 or s["intermediate"] == 0 for s in shapes
    )


def apply_layer_shapes(model: nn.Module, shapes: Sequence[dict | LayerShape]) -> None:
    """Resize freshly built layers to the recorded shapes (weights are loaded afterwards)."""
    cfg = model.config
    ad = adapter_for(cfg)
    geo = base_geometry(cfg)
    layers = ad.layers(model)
    if len(shapes) != len(layers):
        raise ZipkdError(f"config lists {len(shapes)} layer shapes for {len(layers)} layers")
    for layer, s in zip(layers, shapes, strict=True):
        s = s if isinstance(s, LayerShape) else LayerShape(**s)
        if s.kv_heads == 0:
            remove_attention(layer, ad)
        else:
            slice_attention(layer, ad, geo.head_dim, geo.group_size, list(range(s.kv_heads)))
        if s.intermediate == 0:
            remove_mlp(layer, ad)
        else:
            slice_mlp(layer, ad, torch.arange(s.intermediate))
    sync_config(model)
