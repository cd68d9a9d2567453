"""Tiny stand-ins built in memory, no files needed: a character-level tokenizer with a chat template and a
random-weight Llama. For unit tests, smoke runs of the scripts and examples — never for quality numbers."""

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


def random_llama(
    seed: int = 0, weight_std: float = 0.3, device: str = "cpu", dtype: Any = None, **shape: Any
) -> Any:
    """A Llama with `shape` (LlamaConfig keyword arguments; default 3 layers of hidden 32, MLP 64, 4 heads
    over 2 KV heads, vocabulary 128), in eval mode, built on `device` in float32 and then cast to `dtype`.
    Weights are drawn larger than the default initialisation (embeddings N(0, 1), the rest N(0, weight_std),
    norms left at 1) so next-token distributions are peaked and every block matters: pruning mistakes show up
    in the logits. Also the random stand-in for real shapes in the GPU scripts (the embedded model cannot
    travel there)."""
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
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            AutoConfig.for_model("llama", **{**config, **shape}), dtype=torch.float32
        )
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" not in name:
                    p.normal_(0, 1.0 if "embed" in name else weight_std)
    return (model if dtype is None else model.to(dtype)).eval()
