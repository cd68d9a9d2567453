"""Helpers for the recovery tests: a character-level tokenizer with a chat template (so tiny models have a
vocabulary of 128 and train in milliseconds) and a dense → pruned chain of tiny models with manifests."""

from __future__ import annotations

import json
import string
from pathlib import Path

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 128


def tiny_tokenizer(reverse: bool = False):
    """One token per printable character, plus <unk>, <|im_start|>, <|im_end|> (EOS and padding)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [c for c in string.printable if c not in "\x0b\x0c"]
    if reverse:
        chars = chars[::-1]
    vocab = {t: i for i, t in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", *chars])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    tok.chat_template = TEMPLATE
    return tok


def tiny_lm(layers: int = 3, seed: int = 0):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # large weights: peaked next-token distributions, and every block matters
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 1.0 if "embed" in name else 0.3)
    return model


def make_chain(root: Path, teacher_tokenizer=None) -> tuple[Path, Path]:
    """dense (stage convert) → pruned (stage prune: middle layer dropped, MLP of layer 0 halved)."""
    from zipkd.models.adapters import adapter_for
    from zipkd.models.io import save_model
    from zipkd.models.surgery import drop_layers, slice_mlp

    tok = tiny_tokenizer()
    model = tiny_lm()
    dense = save_model(model, teacher_tokenizer or tok, root / "dense", stage="convert")
    slice_mlp(model.model.layers[0], adapter_for(model.config), list(range(32)))
    drop_layers(model, [1])
    pruned = save_model(model, tok, root / "pruned", stage="prune", inputs={"model": dense})
    return dense, pruned


ROWS = [
    {"instruction": "What is 2 + 3?", "response": "2 + 3 = 5. So the answer is 5.", "source": "gsm8k"},
    {"instruction": "What is 4 + 4?", "response": "4 + 4 = 8. So the answer is 8.", "source": "gsm8k"},
    {
        "instruction": "Pick a warm color. Options: red; blue; green.",
        "response": "The answer is red.",
        "source": "mc",
    },
    {"instruction": "Who wrote Hamlet?", "response": "The answer is Shakespeare.", "source": "nq"},
    {"instruction": "Say hello.", "response": "Hello there, friend.", "source": "chat"},
    {
        "instruction": "Name a fruit. Options: apple; stone.",
        "response": "The answer is apple.",
        "source": "mc",
    },
]


def write_jsonl(path: Path, rows=ROWS, repeat: int = 1) -> Path:
    with path.open("w") as f:
        for _ in range(repeat):
            for r in rows:
                f.write(json.dumps(r) + "\n")
    return path
