"""Shared fixtures: tiny random-weight models built from configs (fast), and the real embedded model (slow)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    head_dim=16,
)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Non-trivial norms and biases so slicing mistakes show up in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.1)
    return model.eval()


@pytest.fixture
def tiny_llama():
    return tiny_model("llama")


@pytest.fixture(scope="session")
def real_model():
    from zipkd.models.io import load_model

    return load_model("smollm2-135m")


def ids(n: int = 2, t: int = 12, vocab: int = 128, seed: int = 1):
    import torch

    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


def kill_at_first_checkpoint(cmd, env, work, log, timeout: float, sig: int | None = None):
    """Start `cmd`, send it `sig` (default SIGKILL) as soon as a `ckpt-*` folder appears in `work` (or after
    `timeout` seconds, or when it ends by itself); returns its exit status (−SIGKILL when it was killed mid-run).
    Output goes to `log`: a file, not a pipe, since a full pipe would stall the child."""
    import signal
    import subprocess
    import time

    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not list(work.glob("ckpt-*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL if sig is None else sig)
        return proc.wait()
