"""Tiny stand-ins built in memory, no files needed: a character-level tokenizer with a chat template and
random-weight models of every supported family (`random_model`; `random_llama` for the default Llama). For unit
tests, smoke runs of the scripts and examples — never for quality numbers."""

from __future__ import annotations

import string
from typing import Any

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ("<unk>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2: unknown, BOS, EOS (also padding)
CHARS = tuple(c for c in string.printable if c not in "\x0b\x0c")  # 98 characters
# Real models' geometry (LlamaConfig keyword arguments) for random stand-ins, e.g. in the GPU scripts (the real
# weights cannot travel there): `random_llama(**SMOLLM2_135M)` or `dict(LLAMA3_8B, num_hidden_layers=8)`.
SMOLLM2_135M = dict(
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    tie_word_embeddings=True,
)
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
)


def char_tokenizer(reverse: bool = False) -> Any:
    """One token per printable character after the three special tokens (vocabulary 101), with a ChatML-style
    template. `reverse=True` numbers the characters the other way round: a tokenizer that differs from the
    default in every id but the special ones."""
    chars = CHARS[::-1] if reverse else CHARS
    vocab = {t: i for i, t in enumerate([*SPECIAL, *chars])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL[0]))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token=SPECIAL[0],
        bos_token=SPECIAL[1],
        eos_token=SPECIAL[2],
        pad_token=SPECIAL[2],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def byte_tokenizer() -> Any:
    """A byte-level BPE tokenizer with one merge (256 byte tokens, "Ġt", 2 specials; vocabulary 259): nearly one
    token per byte, a vocabulary llama.cpp's `gpt2` tokenizer model reproduces (for GGUF export tests)."""
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    for token in ("Ġt", "<|endoftext|>", "<|im_start|>"):
        vocab[token] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|im_start|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    return tok


# Per-family config keywords over the common tiny shape that switch on what the family does differently, so
# that tests exercise it: Gemma 2's soft-caps, both families' sliding/global layer types with a window shorter
# than test sequences, Phi-3's partial rotary and long-rope scaling, Granite's multipliers.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {},
    "qwen2": {},
    "qwen3": {},
    "gemma2": dict(
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        sliding_window=4,
        hidden_activation="gelu_pytorch_tanh",
    ),
    "gemma3_text": dict(sliding_window=4, final_logit_softcapping=None),
    "phi3": dict(pad_token_id=2, bos_token_id=1, eos_token_id=2),
    "olmo2": dict(pad_token_id=2, bos_token_id=1, eos_token_id=2),
    "granite": dict(
        embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25, logits_scaling=4.0
    ),
}
# Phi-3.5-style long-rope scaling for a tiny Phi-3 at partial rotary 0.5 (head_dim 8: 4 rotary dims, 2 factors)
PHI3_LONG_ROPE = dict(
    partial_rotary_factor=0.5,
    rope_scaling=dict(rope_type="longrope", short_factor=[1.0, 1.5], long_factor=[2.0, 4.0]),
    original_max_position_embeddings=64,
)


def family_config(family: str = "llama", **shape: Any) -> Any:
    """A transformers config of `family` (a model_type zipkd supports) with the tiny shape of `random_model`
    and the family's distinguishing features on (`FAMILY_DEFAULTS`); `shape` overrides any keyword."""
    if family not in FAMILY_DEFAULTS:
        raise ValueError(f"no tiny config for {family!r}; choose one of {', '.join(FAMILY_DEFAULTS)}")
    config = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        **FAMILY_DEFAULTS[family],
    )
    config.update(shape)
    if family in ("gemma2", "gemma3_text"):
        config.setdefault("query_pre_attn_scalar", config["head_dim"])  # as in Gemma 2 2B/9B, Gemma 3
    if family in ("gemma2", "gemma3_text") and "layer_types" not in shape:
        n = config["num_hidden_layers"]  # sliding and global layers alternate (Gemma 3 real: 5 to 1)
        config["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return AutoConfig.for_model(family, **config)


def random_model(
    family: str = "llama",
    seed: int = 0,
    weight_std: float = 0.3,
    device: str = "cpu",
    dtype: Any = None,
    norm_std: float = 0.0,
    **shape: Any,
) -> Any:
    """A random model of `family` (`family_config`), in eval mode, built on `device` in float32 and then cast to
    `dtype`. Weights are drawn larger than the default initialisation (embeddings N(0, 1), the rest N(0,
    weight_std)) so next-token distributions are peaked and every block matters: pruning mistakes show up in
    the logits. Norms stay at their identity value unless `norm_std` > 0 jitters them (N(0, norm_std) added),
    so that a misplaced norm weight shows up too."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(family_config(family, **shape), dtype=torch.float32)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.normal_(0, 1.0 if "embed" in name else weight_std)
                elif norm_std > 0:
                    p.add_(torch.randn_like(p) * norm_std)
    return (model if dtype is None else model.to(dtype)).eval()


def random_llama(
    seed: int = 0, weight_std: float = 0.3, device: str = "cpu", dtype: Any = None, **shape: Any
) -> Any:
    """A Llama with `shape` (LlamaConfig keyword arguments; default 3 layers of hidden 32, MLP 64, 4 heads
    over 2 KV heads, vocabulary 128), in eval mode, built on `device` in float32 and then cast to `dtype`.
    Weights are drawn larger than the default initialisation (embeddings N(0, 1), the rest N(0, weight_std),
    norms left at 1) so next-token distributions are peaked and every block matters: pruning mistakes show up
    in the logits. Also the random stand-in for real shapes in the GPU scripts (the embedded model cannot
    travel there)."""
    return random_model("llama", seed, weight_std, device, dtype, **shape)
