"""Helpers for the recovery tests: a character-level tokenizer with a chat template (so tiny models have a
vocabulary of 128 and train in milliseconds) and a dense → pruned chain of tiny models with manifests."""

from __future__ import annotations

import json
from pathlib import Path

from zipkd.models.tiny import char_tokenizer, random_llama

VOCAB = 128


def tiny_tokenizer(reverse: bool = False):
    return char_tokenizer(reverse)


def tiny_lm(layers: int = 3, seed: int = 0):
    return random_llama(seed, weight_std=0.3, num_hidden_layers=layers, vocab_size=VOCAB)


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
