"""Structural surgery: slice attention KV groups and MLP channels, remove blocks, drop layers, and keep the
config's per-layer shapes (`zipkd_layers`) in step so the model saves and reloads.

What differs between families (fused projections, post-norms, q/k norms over the whole projection, config
fields the attention reads) comes from the adapter (`zipkd.models.adapters`), never from a family name.

A removed attention or MLP block becomes a `ZeroBlock` (its pre- and post-norms become `Identity`), so the
residual stream passes through unchanged; a layer with both removed is dropped. Attention modules are renumbered
compactly (`layer_idx`), since the KV cache is indexed by it — except in a model with mixed attention types
(Gemma's sliding and global layers), where the model picks each layer's mask and rotary embedding by its
position while the cache picks its layer type by `layer_idx`: there attention modules keep their position as
`layer_idx`, and a removed attention block keeps its cache slot filled with a one-value-per-token placeholder, so
the cache holds a normal layer at every position (transformers reads the sequence length from slot 0)."""

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
    """A removed attention or MLP block: contributes nothing to the residual stream.

    A removed attention block with a `layer_idx` (mixed attention types, see the module docstring) writes a
    placeholder of one value per token (one head of width 1) to its cache slot, so that slot tracks the sequence
    length like every other: transformers reads the cached length from slot 0 when it builds positions."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.layer_idx: int | None = None

    def forward(self, hidden_states: torch.Tensor | None = None, *args: Any, **kwargs: Any):
        if hidden_states is None:
            hidden_states = kwargs.get("x", args[0] if args else None)
        out = torch.zeros_like(hidden_states)
        if self.kind != "attention":
            return out
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and self.layer_idx is not None:
            b, t = hidden_states.shape[:2]
            slot = hidden_states.new_zeros(b, 1, t, 1)
            cache.update(slot, slot, self.layer_idx)
        return out, None

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


class LayerConfig:
    """A view of the model's config with a few values of one layer over it (a sliced Phi-3 attention's head
    counts, which its forward reads from the config). Everything else, including later changes such as the
    attention implementation, is read from the model's config."""

    def __init__(self, base: Any, **values: Any):
        self.__dict__["_base"] = base
        self.__dict__["_values"] = dict(values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or "_base" not in self.__dict__:
            raise AttributeError(name)
        values = self.__dict__["_values"]
        return values[name] if name in values else getattr(self.__dict__["_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.__dict__["_values"]:
            self.__dict__["_values"][name] = value
        else:
            setattr(self.__dict__["_base"], name, value)

    def __repr__(self) -> str:
        return f"LayerConfig({self.__dict__['_values']} over {type(self.__dict__['_base']).__name__})"


def _base_config(config: Any) -> Any:
    return config.__dict__["_base"] if isinstance(config, LayerConfig) else config


def _set_head_counts(attn: nn.Module, ad: ArchAdapter, kv: int, group_size: int) -> None:
    """Tell a sliced attention module its head counts: the instance attributes some families keep and, for
    families whose forward reads them from the config, a per-layer config view."""
    counts = {"num_key_value_heads": kv, "num_attention_heads": kv * group_size, "num_heads": kv * group_size}
    for name, value in counts.items():
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value)
    if hasattr(attn, "num_key_value_groups"):
        attn.num_key_value_groups = group_size
    if ad.attn_config and hasattr(attn, "config"):
        attn.config = LayerConfig(_base_config(attn.config), **{n: counts[n] for n in ad.attn_config})


def _slice_norm(norm: nn.Module, rows: torch.Tensor) -> None:
    """Keep the given entries of a norm's weight (a q/k norm over the whole projection)."""
    w = norm.weight
    norm.weight = nn.Parameter(
        w.data.index_select(0, rows.to(w.device)).clone(), requires_grad=w.requires_grad
    )


def attention_removed(layer: nn.Module, ad: ArchAdapter) -> bool:
    return isinstance(ad.attention(layer), ZeroBlock)


def mlp_removed(layer: nn.Module, ad: ArchAdapter) -> bool:
    return isinstance(ad.mlp_block(layer), ZeroBlock)


def remove_attention(layer: nn.Module, ad: ArchAdapter) -> None:
    """The attention block becomes a ZeroBlock and its pre- and post-norms Identity."""
    setattr(layer, ad.attn, ZeroBlock("attention"))
    for name in ad.norm_names("attention"):
        setattr(layer, name, nn.Identity())


def remove_mlp(layer: nn.Module, ad: ArchAdapter) -> None:
    """The MLP block becomes a ZeroBlock and its pre- and post-norms Identity."""
    setattr(layer, ad.mlp, ZeroBlock("mlp"))
    for name in ad.norm_names("mlp"):
        setattr(layer, name, nn.Identity())


def kv_heads_of(layer: nn.Module, ad: ArchAdapter, head_dim: int) -> int:
    attn = ad.attention(layer)
    if isinstance(attn, ZeroBlock):
        return 0
    if ad.qkv:  # rows: q (= o_proj's inputs), then k and v
        return (getattr(attn, ad.qkv).out_features - getattr(attn, ad.o).in_features) // (2 * head_dim)
    return getattr(attn, ad.k).out_features // head_dim


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
    kv_rows, q_rows = head_rows(groups, head_dim, group_size)
    if ad.qkv:  # one fused projection: the kept query heads, then their KV heads' key and value rows
        q_dim, kv_dim = n_groups * group_size * head_dim, n_groups * head_dim
        rows = torch.cat([q_rows, q_dim + kv_rows, q_dim + kv_dim + kv_rows])
        setattr(attn, ad.qkv, _slice_linear(getattr(attn, ad.qkv), rows=rows))
    else:
        setattr(attn, ad.q, _slice_linear(getattr(attn, ad.q), rows=q_rows))
        setattr(attn, ad.k, _slice_linear(getattr(attn, ad.k), rows=kv_rows))
        setattr(attn, ad.v, _slice_linear(getattr(attn, ad.v), rows=kv_rows))
    setattr(attn, ad.o, _slice_linear(getattr(attn, ad.o), cols=q_rows))
    if ad.qk_norm == "projection":  # norms over the whole q/k projection keep the kept rows' weights
        _slice_norm(getattr(attn, ad.q_norm), q_rows)
        _slice_norm(getattr(attn, ad.k_norm), kv_rows)
    _set_head_counts(attn, ad, len(groups), group_size)


def head_rows(groups: torch.Tensor, head_dim: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the key/value projections and of the query projection (= o_proj columns) of the given KV
    groups, each KV head with its `group_size` query heads."""
    kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    q_heads = (groups[:, None] * group_size + torch.arange(group_size)).reshape(-1)
    q_rows = (q_heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
    return kv_rows, q_rows


def slice_mlp(layer: nn.Module, ad: ArchAdapter, keep_channels: Sequence[int] | torch.Tensor) -> None:
    """Keep the given MLP channels (rows of gate/up, columns of down); empty removes the MLP block."""
    keep = torch.as_tensor(keep_channels, dtype=torch.long).sort().values
    if keep.numel() == 0:
        remove_mlp(layer, ad)
        return
    mlp = ad.mlp_block(layer)
    if ad.gate_up:  # one fused projection: gate rows, then the matching up rows
        width = getattr(mlp, ad.down).in_features
        setattr(
            mlp, ad.gate_up, _slice_linear(getattr(mlp, ad.gate_up), rows=torch.cat([keep, width + keep]))
        )
    else:
        setattr(mlp, ad.gate, _slice_linear(getattr(mlp, ad.gate), rows=keep))
        setattr(mlp, ad.up, _slice_linear(getattr(mlp, ad.up), rows=keep))
    setattr(mlp, ad.down, _slice_linear(getattr(mlp, ad.down), cols=keep))
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = keep.numel()


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
    """Drop empty layers, renumber attention `layer_idx` (see the module docstring) and write per-layer shapes
    to the config.

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
    if "kv_sharing_modes" in cfg.__dict__:
        # Earlier zipkd versions gave removed attention blocks transformers' `DummyLayer` cache slots this way;
        # transformers 5.25 no longer reads a sequence length past a `DummyLayer` in slot 0. None of the
        # supported families shares KV caches, so the field only ever comes from zipkd.
        del cfg.kv_sharing_modes
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
    removed = [isinstance(ad.attention(layer), ZeroBlock) for layer in kept]
    if kept_types and len(set(kept_types)) > 1 and any(removed):
        # Mixed attention types: the model picks a layer's mask and rotary embedding by its position and the
        # cache picks a layer's type by `layer_idx`, so both stay the position; a removed block fills its slot
        # with a placeholder (`ZeroBlock`).
        for j, layer in enumerate(kept):
            ad.attention(layer).layer_idx = j
        cfg.layer_types = kept_types
    else:
        # Compact KV-cache indices over the layers that still have attention.
        attn_types, rest_types, idx = [], [], 0
        for j, layer in enumerate(kept):
            if removed[j]:
                ad.attention(layer).layer_idx = None  # no cache slot
                rest_types.append(kept_types[j] if kept_types else None)
                continue
            ad.attention(layer).layer_idx = idx
            idx += 1
            attn_types.append(kept_types[j] if kept_types else None)
        if kept_types:
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
    for layer, shape in zip(kept, shapes, strict=True):
        if shape.kv_heads:
            _set_head_counts(ad.attention(layer), ad, shape.kv_heads, geo.group_size)


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
