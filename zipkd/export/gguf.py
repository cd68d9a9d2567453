"""Export to GGUF for llama.cpp: uniform models as their family's own architecture, heterogeneous ones as
`deci`, whose graph reads per-layer head counts and MLP widths (0 = block removed).

What llama.cpp's `deci` graph does, and how the export keeps every layer zipkd's search can choose exact:
- attention removed (`head_count` 0): the layer's MLP reads the residual stream directly. Exact.
- MLP removed (`feed_forward_length` 0): the graph skips to the next layer *before* keeping the attention
  output, so a layer with attention but no MLP would silently lose its attention. Such a layer gets a stub MLP
  of `STUB_FF` channels whose weights are all zero (it adds exactly 0; quantized zeros stay zero).
- layer 0 without attention: llama.cpp takes the head size and rotary dimensions from layer 0's head count
  (and cannot allocate a KV cache when no layer has KV heads), so layer 0 gets a zero attention block of one KV
  group (all four projections zero: it adds exactly 0) instead of none.
- both removed: the layer is not written at all (zipkd drops such layers already).
Q and K rows are permuted into llama.cpp's rotary layout for the architectures that use it (llama, granite,
deci). What else differs per family — fused projections, post-norms, q/k norms, norm weights stored as offsets
from 1 (Gemma), soft-caps, sliding-window layers, Granite's multipliers — comes from the model's adapter and the
family's `GGUFFamily` entry; a layout llama.cpp's graph for the family cannot hold is refused in one line.

Weights are written as f32 with the `gguf` package; other types come from llama.cpp's quantizer."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zipkd.data.assets import heldout_text_path
from zipkd.data.text import load_texts
from zipkd.errors import ZipkdError
from zipkd.models.adapters import ADAPTERS, adapter_for
from zipkd.models.surgery import base_geometry, is_heterogeneous, layer_shapes
from zipkd.outputs import atomic_write_text
from zipkd.paths import cache_dir
from zipkd.runtimes.llamacpp import open_model

STUB_FF = 32  # channels of the zero MLP that stands in for a removed MLP behind a kept attention block


@dataclass(frozen=True)
class GGUFFamily:
    """How a family maps onto llama.cpp: its architecture for uniform layouts and what that graph needs."""

    arch: str  # llama.cpp architecture of a uniform layout
    permute: bool = False  # Q/K rows need llama.cpp's rotary layout (the NORM rope type)
    deci: str | None = None  # None: a heterogeneous layout maps onto `deci`; else what deci lacks (a phrase)
    full_heads: bool = (
        False  # the graph takes the head size from hidden / heads: query heads cannot be pruned
    )
    output: bool = False  # the graph reads output.weight even where the embeddings are tied
    keys: Callable[[Any, Any, Sequence[GGUFLayer]], None] | None = (
        None  # family header keys (writer, config, layers)
    )
    check: Callable[[Any], None] | None = None  # refuses configs the graph cannot reproduce (config)


def _layer_types(config: Any, layers: Sequence[GGUFLayer]) -> list[str]:
    types = list(getattr(config, "layer_types", None) or [])
    return [types[lay.source] if lay.source < len(types) else "full_attention" for lay in layers]


def _sliding_keys(writer: Any, config: Any, layers: Sequence[GGUFLayer]) -> None:
    """Sliding-window size and the per-layer pattern (True = sliding), from the config's layer types."""
    types = _layer_types(config, layers)
    if "sliding_attention" in types and getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in types])


def _gemma2_keys(writer: Any, config: Any, layers: Sequence[GGUFLayer]) -> None:
    _sliding_keys(writer, config, layers)
    writer.add_rope_freq_base_swa(_rope(config)[1])
    for key, add in (
        ("attn_logit_softcapping", writer.add_attn_logit_softcapping),
        ("final_logit_softcapping", writer.add_final_logit_softcapping),
    ):
        if getattr(config, key, None):
            add(float(getattr(config, key)))


def _gemma3_keys(writer: Any, config: Any, layers: Sequence[GGUFLayer]) -> None:
    _sliding_keys(writer, config, layers)
    writer.add_rope_freq_base_swa(_rope(config, "sliding_attention")[1])
    if getattr(config, "final_logit_softcapping", None):
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))


def _granite_keys(writer: Any, config: Any, layers: Sequence[GGUFLayer]) -> None:
    writer.add_logit_scale(float(config.logits_scaling))
    writer.add_residual_scale(float(config.residual_multiplier))
    writer.add_embedding_scale(float(config.embedding_multiplier))
    writer.add_attention_scale(float(config.attention_multiplier))


def _gemma_check(config: Any) -> None:
    """llama.cpp's Gemma graphs scale queries by 1/sqrt(head_dim) (transformers: query_pre_attn_scalar^-1/2)."""
    head_dim = base_geometry(config).head_dim
    if float(getattr(config, "query_pre_attn_scalar", head_dim)) != float(head_dim):
        raise ZipkdError(
            f"this {config.model_type} scales queries by query_pre_attn_scalar={config.query_pre_attn_scalar}, "
            f"llama.cpp's graph by head_dim={head_dim}; it has no GGUF export in zipkd"
        )
    if config.model_type == "gemma3_text" and getattr(config, "attn_logit_softcapping", None):
        raise ZipkdError(
            "llama.cpp's gemma3 graph has no attention soft-capping; this model has no GGUF export"
        )
    if not getattr(config, "tie_word_embeddings", True) and config.model_type == "gemma2":
        raise ZipkdError(
            "llama.cpp's gemma2 graph reads the output layer from the embeddings; untied has no export"
        )


# Families and their llama.cpp architecture (see `GGUFFamily`).
FAMILIES: dict[str, GGUFFamily] = {
    "llama": GGUFFamily("llama", permute=True),
    "mistral": GGUFFamily("llama", permute=True),
    "qwen2": GGUFFamily("qwen2"),
    "qwen3": GGUFFamily("qwen3", deci="per-head q/k norms"),
    "granite": GGUFFamily("granite", permute=True, deci="Granite's multipliers", keys=_granite_keys),
    "gemma2": GGUFFamily(
        "gemma2", deci="post-norms, soft-caps or sliding-window layers", keys=_gemma2_keys, check=_gemma_check
    ),
    "gemma3_text": GGUFFamily(
        "gemma3", deci="post-norms, q/k norms or sliding-window layers", keys=_gemma3_keys, check=_gemma_check
    ),
    "phi3": GGUFFamily("phi3", deci="partial rotary or long-rope scaling", full_heads=True),
    "olmo2": GGUFFamily("olmo2", deci="post-norms or q/k norms", full_heads=True, output=True),
}


# Pre-tokenizers llama.cpp knows, tried in this order until one tokenizes the probe corpus exactly as the
# Hugging Face tokenizer does (see `detect_pre`).
PRE_CANDIDATES = (
    "smollm",
    "llama-bpe",
    "qwen2",
    "gpt-2",
    "default",
    "deepseek-llm",
    "deepseek-coder",
    "falcon",
    "starcoder",
    "refact",
    "command-r",
    "dbrx",
    "olmo",
    "stablelm2",
    "mpt",
    "jais",
    "tekken",
    "bloom",
    "gpt3-finnish",
    "exaone",
    "chameleon",
    "minerva-7b",
    "gpt-4o",
    "superbpe",
    "trillion",
    "bailingmoe",
    "llama4",
    "pixtral",
    "seed-coder",
    "hunyuan",
    "kimi-k2",
    "grok-2",
)


@dataclass(frozen=True)
class GGUFLayer:
    """One layer as llama.cpp sees it. `attn`: full | none | zero (one zero KV group, layer 0 only);
    `mlp`: full | stub (zero MLP of STUB_FF channels)."""

    n_head: int
    n_head_kv: int
    n_ff: int
    attn: str
    mlp: str
    source: int  # index of the zipkd layer it comes from


def plan_layers(shapes: Sequence[Any], group_size: int, num_heads: int) -> list[GGUFLayer]:
    """The llama.cpp layers for zipkd per-layer shapes (LayerShape or dicts: kv_heads, intermediate). Pure."""
    out: list[GGUFLayer] = []
    for i, s in enumerate(shapes):
        kv, w = (s["kv_heads"], s["intermediate"]) if isinstance(s, dict) else (s.kv_heads, s.intermediate)
        if kv == 0 and w == 0:
            continue  # an empty layer passes the residual stream through: leave it out
        if kv > 0:
            attn, n_head, n_kv = "full", kv * group_size, kv
        elif not out:
            attn, n_head, n_kv = "zero", group_size, 1  # layer 0 must have heads (see module docstring)
        else:
            attn, n_head, n_kv = "none", 0, 0
        if w > 0:
            mlp, n_ff = "full", w
        elif attn != "none":
            mlp, n_ff = "stub", STUB_FF  # a kept attention output survives only behind an MLP
        else:
            mlp, n_ff = "none", 0  # unreachable: kv == 0 and w == 0 was skipped
        out.append(GGUFLayer(n_head, n_kv, n_ff, attn, mlp, i))
    if not out:
        raise ZipkdError("every decoder layer was removed; there is nothing to export")
    return out


def is_uniform(layers: Sequence[GGUFLayer]) -> bool:
    return all(lay.attn == "full" and lay.mlp == "full" for lay in layers) and (
        len({(lay.n_head_kv, lay.n_ff) for lay in layers}) == 1
    )


def choose_arch(family: str, layers: Sequence[GGUFLayer], num_heads: int | None = None) -> str:
    """The llama.cpp architecture for this family and layout; one clear error where there is none.
    `num_heads`: the base model's query heads, for families whose graph cannot take pruned heads."""
    if family not in FAMILIES:
        raise ZipkdError(
            f"no GGUF mapping for architecture {family!r}; zipkd exports {', '.join(sorted(FAMILIES))}"
        )
    info = FAMILIES[family]
    if is_uniform(layers):
        if num_heads is not None:
            _check_heads(family, layers[0].n_head, num_heads)
        return info.arch
    if info.deci is not None:
        raise ZipkdError(
            f"a heterogeneous {family} model has no llama.cpp mapping (llama.cpp's per-layer `deci` graph has no "
            f"{info.deci}); prune with a uniform layout (`--layout uniform`) to export it"
        )
    return "deci"


def _check_heads(family: str, n_head: int, num_heads: int) -> None:
    info = FAMILIES[family]
    if info.full_heads and n_head != num_heads:
        raise ZipkdError(
            f"{family} models with pruned attention heads have no llama.cpp mapping (llama.cpp's {info.arch} "
            "graph takes the head size from hidden / heads); prune keeping every head (MLP widths and layers "
            "only) to export one"
        )


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotary layout (halves) → llama.cpp's (interleaved pairs), per head; rows of Q or K (a
    weight matrix or a bias vector). Pure."""
    if n_head == 0:
        return w
    rest = w.shape[1:]
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


def _np(t: Any) -> np.ndarray:
    return t.detach().to("cpu").float().numpy()


def tensors(model: Any, layers: Sequence[GGUFLayer], arch: str) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every tensor of the model in llama.cpp's naming; zero stubs included.
    The adapter says where each tensor lives (fused projections, pre-/post-norms, q/k norms); norm weights
    stored as offsets from 1 get the 1 added (llama.cpp multiplies by the weight)."""
    cfg = model.config
    ad = adapter_for(cfg)
    geo = base_geometry(cfg)
    permute = arch == "deci" or FAMILIES[ad.family].permute
    hidden = geo.hidden_size

    def norm(module: Any) -> np.ndarray:
        return _np(module.weight) + np.float32(ad.norm_offset)

    yield "token_embd.weight", _np(model.get_input_embeddings().weight)
    hf_layers = ad.layers(model)
    for j, lay in enumerate(layers):
        layer = hf_layers[lay.source]
        p = f"blk.{j}"
        if lay.attn == "full":
            attn = ad.attention(layer)
            if ad.attn_norm:
                yield f"{p}.attn_norm.weight", norm(getattr(layer, ad.attn_norm))
            o = getattr(attn, ad.o)
            if ad.qkv:  # llama.cpp splits a fused attn_qkv the same way (q heads, k heads, v heads)
                yield f"{p}.attn_qkv.weight", _np(getattr(attn, ad.qkv).weight)
            else:
                q, k, v = (getattr(attn, n) for n in (ad.q, ad.k, ad.v))
                wq, wk = _np(q.weight), _np(k.weight)
                yield f"{p}.attn_q.weight", permute_rows(wq, lay.n_head) if permute else wq
                yield f"{p}.attn_k.weight", permute_rows(wk, lay.n_head_kv) if permute else wk
                yield f"{p}.attn_v.weight", _np(v.weight)
                for name, lin, heads in (
                    ("attn_q", q, lay.n_head),
                    ("attn_k", k, lay.n_head_kv),
                    ("attn_v", v, 0),
                ):
                    if getattr(lin, "bias", None) is not None:
                        b = _np(lin.bias)
                        yield f"{p}.{name}.bias", permute_rows(b, heads) if permute and heads else b
            yield f"{p}.attn_output.weight", _np(o.weight)
            if getattr(o, "bias", None) is not None:
                yield f"{p}.attn_output.bias", _np(o.bias)
            if ad.qk_norm:
                for hf, gg in ((ad.q_norm, "attn_q_norm"), (ad.k_norm, "attn_k_norm")):
                    yield f"{p}.{gg}.weight", norm(getattr(attn, hf))
            if ad.attn_post_norm:
                yield f"{p}.post_attention_norm.weight", norm(getattr(layer, ad.attn_post_norm))
        elif lay.attn == "zero":
            d, zero = geo.head_dim, np.zeros
            yield f"{p}.attn_norm.weight", np.ones(hidden, dtype=np.float32)
            yield f"{p}.attn_q.weight", zero((lay.n_head * d, hidden), dtype=np.float32)
            yield f"{p}.attn_k.weight", zero((d, hidden), dtype=np.float32)
            yield f"{p}.attn_v.weight", zero((d, hidden), dtype=np.float32)
            yield f"{p}.attn_output.weight", zero((hidden, lay.n_head * d), dtype=np.float32)
        if lay.mlp == "full":
            mlp = ad.mlp_block(layer)
            if ad.mlp_norm:
                yield f"{p}.ffn_norm.weight", norm(getattr(layer, ad.mlp_norm))
            if ad.gate_up:  # llama.cpp's fused ffn_up: gate rows, then up rows (its SwiGLU splits it so)
                yield f"{p}.ffn_up.weight", _np(getattr(mlp, ad.gate_up).weight)
            else:
                yield f"{p}.ffn_gate.weight", _np(getattr(mlp, ad.gate).weight)
                yield f"{p}.ffn_up.weight", _np(getattr(mlp, ad.up).weight)
            yield f"{p}.ffn_down.weight", _np(getattr(mlp, ad.down).weight)
            if ad.mlp_post_norm:
                yield f"{p}.post_ffw_norm.weight", norm(getattr(layer, ad.mlp_post_norm))
        elif lay.mlp == "stub":
            yield f"{p}.ffn_norm.weight", np.ones(hidden, dtype=np.float32)
            yield f"{p}.ffn_gate.weight", np.zeros((STUB_FF, hidden), dtype=np.float32)
            yield f"{p}.ffn_up.weight", np.zeros((STUB_FF, hidden), dtype=np.float32)
            yield f"{p}.ffn_down.weight", np.zeros((hidden, STUB_FF), dtype=np.float32)
    yield "output_norm.weight", _np(_final_norm(model, ad)) + np.float32(ad.norm_offset)
    if not getattr(cfg, "tie_word_embeddings", False) or FAMILIES[ad.family].output:
        yield "output.weight", _np(model.get_output_embeddings().weight)


def _final_norm(model: Any, ad: Any) -> Any:
    obj = model
    for part in ad.final_norm.split("."):
        obj = getattr(obj, part)
    return obj.weight


# ---------------------------------------------------------------- metadata


@dataclass(frozen=True)
class Hparams:
    """The architecture numbers a GGUF header needs (from a transformers config)."""

    hidden_size: int
    head_dim: int
    num_heads: int
    context_length: int
    rms_eps: float
    rope_theta: float
    vocab_size: int
    name: str
    rope_dims: int | None = None  # rotary dimensions per head (partial rotary); None: head_dim
    family: str | None = None  # the config's model_type: which tensors a layer has (`random_tensors`)
    config: Any = field(default=None, compare=False, repr=False)  # for the family's own header keys


def _rope(config: Any, layer_type: str = "full_attention") -> tuple[str, float, float]:
    """(rope type, theta, partial rotary factor) of the config; per layer type where the config has one set of
    rope parameters per type (Gemma 3: global and sliding layers)."""
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and isinstance(rope.get(layer_type), dict):
        rope = rope[layer_type]
    if not isinstance(rope, dict):
        rope = {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = rope.get("rope_type") or scaling.get("rope_type") or "default"
    theta = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    partial = rope.get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None) or 1.0
    return kind, float(theta), float(partial)


def hparams(config: Any) -> Hparams:
    """The header numbers of `config`; a config the family's llama.cpp graph cannot reproduce is refused here,
    before any work (rope scaling other than the default, Gemma's query scaling, …)."""
    geo = base_geometry(config)
    family = FAMILIES.get(getattr(config, "model_type", None))
    if family is not None and family.check is not None:
        family.check(config)
    if family is not None and not is_heterogeneous(config):
        _check_heads(config.model_type, int(config.num_attention_heads), geo.num_heads)
    types = set(getattr(config, "layer_types", None) or ["full_attention"])
    for layer_type in sorted(types):
        kind = _rope(config, layer_type)[0]
        if kind not in ("default", None):
            raise ZipkdError(f"rope scaling {kind!r} has no GGUF export in zipkd yet")
    _, theta, partial = _rope(config)
    return Hparams(
        hidden_size=geo.hidden_size,
        head_dim=geo.head_dim,
        num_heads=geo.num_heads,
        context_length=int(getattr(config, "max_position_embeddings", 2048)),
        rms_eps=float(getattr(config, "rms_norm_eps", 1e-6)),
        rope_theta=theta,
        vocab_size=int(config.vocab_size),
        name=str(getattr(config, "_name_or_path", "") or config.model_type),
        rope_dims=int(geo.head_dim * partial) if partial != 1.0 else None,
        family=config.model_type,
        config=config,
    )


def _per_layer(values: Sequence[int]) -> int | list[int]:
    return values[0] if len(set(values)) == 1 else list(values)


def write_header(
    writer: Any, arch: str, hp: Hparams, layers: Sequence[GGUFLayer], config: Any = None
) -> None:
    """Architecture keys: per-layer arrays for deci, plain numbers for a uniform family, then the family's own
    keys (`GGUFFamily.keys`) from `config` (default: the config `hp` was read from)."""
    config = config if config is not None else hp.config
    writer.add_name(Path(hp.name).name or arch)
    writer.add_context_length(hp.context_length)
    writer.add_embedding_length(hp.hidden_size)
    writer.add_block_count(len(layers))
    ff = [lay.n_ff for lay in layers]
    heads = [lay.n_head for lay in layers]
    kv = [lay.n_head_kv for lay in layers]
    if arch == "deci":
        writer.add_feed_forward_length(ff)
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv)
    else:
        writer.add_feed_forward_length(_per_layer(ff))
        writer.add_head_count(_per_layer(heads))
        writer.add_head_count_kv(_per_layer(kv))
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.rope_dims or hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_vocab_size(hp.vocab_size)
    family = FAMILIES.get(getattr(config, "model_type", None)) if config is not None else None
    if family is not None and family.keys is not None and arch == family.arch:
        family.keys(writer, config, layers)


# ---------------------------------------------------------------- tokenizer


@dataclass
class Vocab:
    """Tokenizer metadata for llama.cpp, read from a Hugging Face tokenizer folder."""

    model: str  # gpt2 (byte-level BPE) or llama (SentencePiece-style BPE with byte fallback)
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None
    folder: Path
    pre: str | None = None

    def add_to(self, writer: Any, n_vocab: int) -> None:
        from gguf import SpecialVocab

        writer.add_tokenizer_model(self.model)
        if self.model == "gpt2":
            writer.add_tokenizer_pre(self.pre or "default")
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        SpecialVocab(self.folder, load_merges=self.model == "gpt2", n_vocab=n_vocab).add_to_gguf(
            writer, quiet=True
        )


def read_vocab(folder: Path, n_vocab: int) -> Vocab:
    """Tokens, types (and scores) from `tokenizer.json`, padded to the model's vocabulary size."""
    from gguf import TokenType
    from gguf.vocab import BpeVocab, LlamaHfVocab

    tj = folder / "tokenizer.json"
    if not tj.is_file():
        raise ZipkdError(
            f"{folder} has no tokenizer.json; GGUF export needs a fast (tokenizer.json) tokenizer"
        )
    try:
        model = json.loads(tj.read_text())["model"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise ZipkdError(f"cannot read {tj}: {exc}") from None
    try:
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            hf, kind = LlamaHfVocab(folder), "llama"
        else:
            hf, kind = BpeVocab(folder), "gpt2"
        items = list(hf.all_tokens())
    except (FileNotFoundError, ValueError, KeyError) as exc:
        raise ZipkdError(f"the tokenizer in {folder} has no GGUF mapping ({exc})") from None
    tokens = [t if isinstance(t, bytes) else str(t).encode() for t, _, _ in items]
    scores = [float(s) for _, s, _ in items]
    types = [int(tt) for _, _, tt in items]
    _mark_special(folder, tokens, types)
    if len(tokens) > n_vocab:
        raise ZipkdError(f"the tokenizer has {len(tokens)} tokens but the model only {n_vocab} embeddings")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(TokenType.UNUSED))
    return Vocab(kind, tokens, types, scores if kind == "llama" else None, folder)


def _mark_special(folder: Path, tokens: list[bytes], types: list[int]) -> None:
    """Added tokens marked `special` in tokenizer.json are control tokens, the others user-defined."""
    from gguf import TokenType

    try:
        added = json.loads((folder / "tokenizer.json").read_text()).get("added_tokens") or []
    except (OSError, json.JSONDecodeError):
        return
    for item in added:
        i = item.get("id")
        if isinstance(i, int) and 0 <= i < len(tokens):
            types[i] = int(TokenType.CONTROL if item.get("special") else TokenType.USER_DEFINED)


def probe_texts() -> list[str]:
    """Text for checking that llama.cpp tokenizes as Hugging Face does: held-out prose plus digits, code,
    whitespace runs, punctuation and non-Latin scripts."""
    texts = [
        "Hello world! 12345 67.89 1,000,000 3.14159 and 2024-12-01.",
        "def f(x):\n    return x**2  # square\n\n\tif a != b: print('tab\\t')",
        "   leading spaces, trailing spaces   \n\n\nthree newlines",
        "Ünïcödé naïve café — “quotes” ‘single’ … ½ ¾ € £ ¥",
        "日本語のテキストと中文文本 한국어 텍스트 Русский текст العربية",
        "emoji 😀🎉👍🏽 and symbols <>&|{}[]~^%$#@!",
        "can't won't I'm you're they'll we've he'd IT'S",
        "URL https://example.com/a/b?c=d&e=f#g and email a.b@c.de",
    ]
    try:
        texts += [t[:600] for t in load_texts(heldout_text_path())[:40]]
    except Exception:  # noqa: BLE001 - the fixed probes alone still check the tokenizer
        pass
    return texts


def _hf_ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def detect_pre(tokenizer: Any, vocab: Vocab, n_vocab: int, texts: Sequence[str] | None = None) -> str | None:
    """The llama.cpp pre-tokenizer that reproduces the Hugging Face tokenizer on the probe texts, tried by
    writing vocabulary-only GGUFs (cached per tokenizer). None for SentencePiece-style vocabularies."""
    if vocab.model != "gpt2":
        return None
    import hashlib

    texts = list(texts or probe_texts())
    digest = hashlib.sha256((vocab.folder / "tokenizer.json").read_bytes()).hexdigest()[:16]
    cache = cache_dir() / "gguf-pre" / f"{digest}.json"
    if cache.is_file():
        try:
            return json.loads(cache.read_text())["pre"]
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    want = [_hf_ids(tokenizer, t) for t in texts]
    with tempfile.TemporaryDirectory(prefix="zipkd-pre-") as tmp:
        for pre in PRE_CANDIDATES:
            vocab.pre = pre
            path = Path(tmp) / f"{pre}.gguf"
            write_vocab_only(path, vocab, n_vocab)
            if engine_tokenizes_like(path, texts, want):
                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(cache, json.dumps({"pre": pre}) + "\n")
                return pre
    vocab.pre = None
    raise ZipkdError(
        "no llama.cpp pre-tokenizer reproduces this model's Hugging Face tokenizer; its GGUF would tokenize "
        "differently, so zipkd does not write one"
    )


def write_vocab_only(path: Path, vocab: Vocab, n_vocab: int) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_head_count(1)
    w.add_feed_forward_length(64)
    w.add_context_length(64)
    vocab.add_to(w, n_vocab)
    _write(w)


def engine_tokenizes_like(path: Path, texts: Sequence[str], want: Sequence[Sequence[int]]) -> bool:
    try:
        em = open_model(path, vocab_only=True, n_ctx=64)
    except ZipkdError:
        return False
    with em:
        return all(
            em.tokenize(t, add_bos=False, special=False) == list(w) for t, w in zip(texts, want, strict=True)
        )


def _write(writer: Any) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---------------------------------------------------------------- export


def write_gguf(
    path: Path,
    arch: str,
    hp: Hparams,
    layers: Sequence[GGUFLayer],
    arrays: Iterator[tuple[str, np.ndarray]],
    vocab: Vocab | None,
    extra: dict[str, str] | None = None,
    f16: bool = False,
    config: Any = None,
) -> None:
    """Write a GGUF: header, tokenizer, extra string keys, then the (name, array) tensors, in f32 (or matrices
    in f16 with `f16`: half the bytes, for timing models that llama.cpp quantizes anyway). `config`: the
    model's config, for the family's own header keys."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    write_header(writer, arch, hp, layers, config)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32)
    if vocab is not None:
        vocab.add_to(writer, hp.vocab_size)
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    for name, arr in arrays:
        dtype = np.float16 if f16 and arr.ndim > 1 else np.float32
        writer.add_tensor(name, np.ascontiguousarray(arr, dtype=dtype))
    _write(writer)


def model_vocab(tokenizer_folder: Path | None, tokenizer: Any, n_vocab: int) -> Vocab | None:
    """The tokenizer metadata for a model, with the pre-tokenizer that makes llama.cpp match Hugging Face."""
    if tokenizer_folder is None:
        return None
    vocab = read_vocab(tokenizer_folder, n_vocab)
    vocab.pre = detect_pre(tokenizer, vocab, n_vocab) if tokenizer is not None else None
    return vocab


def write_f32(
    model: Any,
    tokenizer_folder: Path | None,
    tokenizer: Any,
    path: Path,
    extra: dict[str, str] | None = None,
) -> str:
    """Write the model as an f32 GGUF at `path`; returns the llama.cpp architecture used."""
    cfg = model.config
    ad = adapter_for(cfg)
    geo = base_geometry(cfg)
    layers = plan_layers(layer_shapes(model), geo.group_size, geo.num_heads)
    arch = choose_arch(ad.family, layers, geo.num_heads)
    hp = hparams(cfg)
    vocab = model_vocab(tokenizer_folder, tokenizer, hp.vocab_size)
    write_gguf(path, arch, hp, layers, tensors(model, layers, arch), vocab, extra, config=cfg)
    return arch


def random_tensors(
    hp: Hparams,
    layers: Sequence[GGUFLayer],
    tied: bool,
    biases: bool = False,
    qk_norm: bool = False,
    seed: int = 0,
) -> Iterator[tuple[str, np.ndarray]]:
    """Random tensors of the right shapes for timing a layout in llama.cpp (speed does not depend on the
    values); views of one shared random pool, so writing a model costs no generation. The tensors a layer has
    (fused projections, pre-/post-norms, q/k norms) follow the adapter of `hp.family`, as `tensors` does."""
    ad = ADAPTERS.get(hp.family or "llama", ADAPTERS["llama"])
    h, d, v = hp.hidden_size, hp.head_dim, hp.vocab_size
    biggest = max(
        [v * h]
        + [3 * lay.n_ff * h for lay in layers]
        + [h * (lay.n_head + 2 * lay.n_head_kv) * d for lay in layers]
    )
    pool = (np.random.default_rng(seed).standard_normal(biggest, dtype=np.float32) * 0.02).astype(np.float16)

    def arr(*shape: int) -> np.ndarray:
        return pool[: int(np.prod(shape))].reshape(shape)

    ones = np.ones(h, dtype=np.float32)
    yield "token_embd.weight", arr(v, h)
    for j, lay in enumerate(layers):
        p = f"blk.{j}"
        if lay.attn in ("full", "zero"):
            if ad.attn_norm or lay.attn == "zero":
                yield f"{p}.attn_norm.weight", ones
            if ad.qkv and lay.attn == "full":
                yield f"{p}.attn_qkv.weight", arr((lay.n_head + 2 * lay.n_head_kv) * d, h)
            else:
                yield f"{p}.attn_q.weight", arr(lay.n_head * d, h)
                yield f"{p}.attn_k.weight", arr(lay.n_head_kv * d, h)
                yield f"{p}.attn_v.weight", arr(lay.n_head_kv * d, h)
            yield f"{p}.attn_output.weight", arr(h, lay.n_head * d)
            if biases:
                yield f"{p}.attn_q.bias", arr(lay.n_head * d)
                yield f"{p}.attn_k.bias", arr(lay.n_head_kv * d)
                yield f"{p}.attn_v.bias", arr(lay.n_head_kv * d)
            if qk_norm or ad.qk_norm:
                q, k = (lay.n_head * d, lay.n_head_kv * d) if ad.qk_norm == "projection" else (d, d)
                yield f"{p}.attn_q_norm.weight", np.ones(q, dtype=np.float32)
                yield f"{p}.attn_k_norm.weight", np.ones(k, dtype=np.float32)
            if ad.attn_post_norm and lay.attn == "full":
                yield f"{p}.post_attention_norm.weight", ones
        if lay.n_ff:
            if ad.mlp_norm or lay.mlp == "stub":
                yield f"{p}.ffn_norm.weight", ones
            if ad.gate_up and lay.mlp == "full":
                yield f"{p}.ffn_up.weight", arr(2 * lay.n_ff, h)
            else:
                yield f"{p}.ffn_gate.weight", arr(lay.n_ff, h)
                yield f"{p}.ffn_up.weight", arr(lay.n_ff, h)
            yield f"{p}.ffn_down.weight", arr(h, lay.n_ff)
            if ad.mlp_post_norm and lay.mlp == "full":
                yield f"{p}.post_ffw_norm.weight", ones
    yield "output_norm.weight", ones
    if not tied or FAMILIES.get(ad.family, FAMILIES["llama"]).output:
        yield "output.weight", arr(v, h)
