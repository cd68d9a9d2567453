"""Perplexity over non-overlapping windows of a held-out token stream (every token scored once)."""

from __future__ import annotations

import math
from typing import Any


def perplexity(
    model: Any,
    tokenizer: Any,
    texts: list[str],
    max_length: int = 512,
    max_tokens: int | None = 16384,
    batch_size: int = 4,
    progress: Any = None,
) -> dict[str, float]:
    """exp(mean NLL) of the next token over windows of `max_length` tokens (first `max_tokens` tokens)."""
    import torch

    from zipkd.data.text import token_stream

    stream = token_stream(tokenizer, texts)
    if max_tokens:
        stream = stream[: max_tokens + 1]
    n_windows = (stream.numel() - 1) // max_length
    if n_windows < 1:
        from zipkd.errors import ZipkdError

        raise ZipkdError(f"evaluation text too short: {stream.numel()} tokens for windows of {max_length}")
    windows = stream[: n_windows * max_length].view(n_windows, max_length)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    task = progress.add_task("perplexity", total=n_windows) if progress is not None else None
    with torch.inference_mode():
        for i in range(0, n_windows, batch_size):
            batch = windows[i : i + batch_size].to(device)
            logits = model(batch).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += loss.item()
            count += batch[:, 1:].numel()
            if task is not None:
                progress.advance(task, batch.shape[0])
    return {"perplexity": math.exp(nll / count), "tokens": count, "max_length": max_length}
