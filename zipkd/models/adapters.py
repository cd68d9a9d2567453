"""Architecture adapters: the one place that knows, per model family, where layers, projections and norms live
and what the head geometry is. Surgery, pruning, profiling and export read these fields instead of testing
family names, so a family is one entry in `ADAPTERS` describing how it differs from the Llama layout:

- norms: each block's pre-norm (`attn_norm`, `mlp_norm`; None where the block has none) and post-norm
  (`attn_post_norm`, `mlp_post_norm`: applied to the block's output before the residual add, Gemma and OLMo-2);
  removing a block removes both;
- fused projections: `qkv` (rows: query heads, then key heads, then value heads) and `gate_up` (rows: gate
  channels, then the matching up channels), Phi-3; sliced consistently;
- q/k norms: `qk_norm="head"` (over head_dim, shared by every head: slicing heads leaves them) or
  `"projection"` (over the whole q/k projection, OLMo-2: sliced with the projection's rows);
- config fields the attention reads at forward time (`attn_config`, Phi-3 splits its fused output by
  `config.num_attention_heads`): a sliced layer gets a config view with its own values;
- scalars of the forward carried unchanged in the config (`residual_scale`, `logit_scale`, `final_softcap`,
  Granite and Gemma 2), which the pruning driver applies where it recomputes part of the forward;
- `norm_offset`: RMSNorm weights stored as offsets from 1 (Gemma computes x·(1 + w)); GGUF export adds it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

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
    qkv: str | None = None  # a fused q/k/v projection (then q, k and v are its row blocks, not modules)
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    gate_up: str | None = None  # a fused gate/up projection (gate rows, then up rows)
    down: str = "down_proj"
    attn_norm: str | None = "input_layernorm"  # pre-norm of the attention block (None: none)
    attn_post_norm: str | None = None  # norm of the attention output, before the residual add
    mlp_norm: str | None = "post_attention_layernorm"  # pre-norm of the MLP block (None: none)
    mlp_post_norm: str | None = None  # norm of the MLP output, before the residual add
    qk_norm: str | None = None  # None | "head" (over head_dim) | "projection" (over the whole q/k projection)
    q_norm: str = "q_norm"
    k_norm: str = "k_norm"
    attn_config: tuple[str, ...] = ()  # config head counts the attention reads in its forward
    residual_scale: str | None = None  # config field scaling each block's output before the residual add
    logit_scale: str | None = None  # config field dividing the logits
    final_softcap: str | None = None  # config field: logits = cap·tanh(logits / cap)
    norm_offset: float = 0.0  # RMSNorm computes x·(norm_offset + w)
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"

    def __post_init__(self) -> None:
        if self.qk_norm not in (None, "head", "projection"):
            raise ValueError(f"qk_norm must be None, 'head' or 'projection' (got {self.qk_norm!r})")

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

    def norm_names(self, block: str) -> tuple[str, ...]:
        """The norms that belong to `block` ("attention" or "mlp"): its pre-norm and post-norm, where it has them."""
        pair = (
            (self.attn_norm, self.attn_post_norm)
            if block == "attention"
            else (self.mlp_norm, self.mlp_post_norm)
        )
        return tuple(n for n in pair if n)

    def pre_norm(self, layer: Any, block: str) -> Any:
        """The block's pre-norm module, or None."""
        name = self.attn_norm if block == "attention" else self.mlp_norm
        return getattr(layer, name) if name else None

    def post_norm(self, layer: Any, block: str) -> Any:
        """The block's post-norm module (on its output), or None."""
        name = self.attn_post_norm if block == "attention" else self.mlp_post_norm
        return getattr(layer, name) if name else None

    def residual_add(
        self, layer: Any, block: str, h: torch.Tensor, out: torch.Tensor, config: Any
    ) -> torch.Tensor:
        """The residual stream after `block`: h + scale · post_norm(out), as the family's decoder layer computes it."""
        post = self.post_norm(layer, block)
        if post is not None:
            out = post(out)
        if self.residual_scale:
            out = out * getattr(config, self.residual_scale)
        return h + out

    def block_input(self, layer: Any, block: str, h: torch.Tensor) -> torch.Tensor:
        """What `block` reads from the residual stream h: its pre-norm of h (h itself without one)."""
        pre = self.pre_norm(layer, block)
        return pre(h) if pre is not None else h

    def head_logits(self, config: Any, logits: torch.Tensor) -> torch.Tensor:
        """lm_head outputs → the model's logits (Granite's logits scaling, Gemma 2's final soft-cap)."""
        if self.logit_scale:
            logits = logits / getattr(config, self.logit_scale)
        cap = getattr(config, self.final_softcap, None) if self.final_softcap else None
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def linear_names(self) -> list[str]:
        """Module names of the layer's projections (fused ones once), e.g. for LoRA targets."""
        attn = [self.qkv] if self.qkv else [self.q, self.k, self.v]
        mlp = [self.gate_up] if self.gate_up else [self.gate, self.up]
        return [*attn, self.o, *mlp, self.down]

    def projection_weight(
        self, owner: Any, role: str, n_kv: int, group_size: int, head_dim: int
    ) -> torch.Tensor:
        """The weight rows of a projection role (q, k, v, o, gate, up, down) of an attention or MLP module,
        read out of a fused projection where the family has one."""
        if role in ("q", "k", "v") and self.qkv:
            w = getattr(owner, self.qkv).weight
            q, kv = n_kv * group_size * head_dim, n_kv * head_dim
            start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[role]
            return w[start : start + size]
        if role in ("gate", "up") and self.gate_up:
            w = getattr(owner, self.gate_up).weight
            half = w.shape[0] // 2
            return w[:half] if role == "gate" else w[half:]
        return getattr(owner, getattr(self, role)).weight


_GEMMA = dict(
    attn_post_norm="post_attention_layernorm",
    mlp_norm="pre_feedforward_layernorm",
    mlp_post_norm="post_feedforward_layernorm",
    final_softcap="final_logit_softcapping",
    norm_offset=1.0,
)
ADAPTERS: dict[str, ArchAdapter] = {
    # Llama-shaped layers (q/k/v/o + gated MLP, pre-norms). Qwen2 adds q/k/v biases (sliced with their rows);
    # Qwen3 adds per-head q/k norms over head_dim, which slicing whole heads leaves untouched.
    "llama": ArchAdapter("llama"),
    "mistral": ArchAdapter("mistral"),
    "qwen2": ArchAdapter("qwen2"),
    "qwen3": ArchAdapter("qwen3", qk_norm="head"),
    # Granite: Llama-shaped; embedding, residual, attention and logit multipliers live in the config.
    "granite": ArchAdapter("granite", residual_scale="residual_multiplier", logit_scale="logits_scaling"),
    # Gemma 2 / 3: sandwich norms, GeGLU, embeddings scaled by sqrt(hidden) inside the embedding module,
    # sliding/global layer types; Gemma 3 adds per-head q/k norms.
    "gemma2": ArchAdapter("gemma2", **_GEMMA),
    "gemma3_text": ArchAdapter("gemma3_text", qk_norm="head", **_GEMMA),
    # Phi-3 / 3.5: fused qkv_proj and gate_up_proj; the attention splits qkv by config.num_attention_heads.
    "phi3": ArchAdapter(
        "phi3",
        qkv="qkv_proj",
        gate_up="gate_up_proj",
        attn_config=("num_attention_heads", "num_key_value_heads"),
    ),
    # OLMo-2: no pre-norms, post-norms after both blocks, q/k norms over the whole projection.
    "olmo2": ArchAdapter(
        "olmo2",
        attn_norm=None,
        attn_post_norm="post_attention_layernorm",
        mlp_norm=None,
        mlp_post_norm="post_feedforward_layernorm",
        qk_norm="projection",
    ),
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


def supported() -> str:
    return ", ".join(sorted(ADAPTERS))


def adapter_for(config: Any) -> ArchAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        hint = " (zipkd prunes Gemma 3's text model, gemma3_text)" if model_type == "gemma3" else ""
        raise ZipkdError(f"unsupported architecture {model_type!r}{hint}; zipkd supports: {supported()}")
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
