"""Architecture adapters: the one place that knows, per model family, where layers, projections and norms live
and what the head geometry is. Adding a family with the Llama layout is one entry in `ADAPTERS`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zipkd.errors import ZipkdError


@dataclass(frozen=True)
class ArchAdapter:
    family: str
    layers_path: str = "model.layers"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"

    def layers(self, model: Any) -> Any:
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def set_layers(self, model: Any, layers: Any) -> None:
        parent_path, name = self.layers_path.rsplit(".", 1)
        parent = model
        for part in parent_path.split("."):
            parent = getattr(parent, part)
        setattr(parent, name, layers)

    def attention(self, layer: Any) -> Any:
        return getattr(layer, self.attn)

    def mlp_block(self, layer: Any) -> Any:
        return getattr(layer, self.mlp)


# Families whose decoder layer is Llama-shaped (q/k/v/o + gated MLP, pre-norms). Qwen2 adds q/k/v biases;
# Qwen3 adds per-head q/k norms over head_dim, which slicing whole heads leaves untouched.
ADAPTERS: dict[str, ArchAdapter] = {
    name: ArchAdapter(family=name) for name in ("llama", "mistral", "qwen2", "qwen3")
}


@dataclass(frozen=True)
class Geometry:
    """Head geometry and widths of the *base* config (per-layer shapes live in `zipkd_layers`)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA group)."""
        return self.num_heads // self.num_kv_heads


def adapter_for(config: Any) -> ArchAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ZipkdError(
            f"unsupported architecture {model_type!r}; zipkd supports: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type]


def geometry(config: Any) -> Geometry:
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Geometry(
        hidden_size=config.hidden_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=config.intermediate_size,
    )
