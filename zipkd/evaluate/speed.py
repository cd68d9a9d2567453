"""Measured speed, size and memory of models in one regime.

Latency comes from `zipkd.latency.measure.compare_ms`: every model (the base and its compressed versions) is
timed alternately in the same run, so load changes on the machine hit them alike; we report medians and
tokens/s. Size: parameter count and weight-file bytes on disk. Peak memory: the device allocator's high-water
mark on CUDA; on CPU the process's resident set sampled during one forward (approximate) on top of the
weights' bytes."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from zipkd.latency.table import Regime

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt")


def parameter_count(model: Any) -> int:
    """Distinct parameters (tied embeddings counted once), as stored (packed quantized weights count as
    stored elements)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def tensor_bytes(model: Any) -> int:
    """Bytes of all distinct parameters and buffers held in memory."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def disk_bytes(path: str | os.PathLike | None) -> int | None:
    """Bytes of the weight files of a model folder (or a .gguf file); None when there is no path."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    if not path.is_dir():
        return None
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES))


def tokens_per_forward(regime: Regime) -> int:
    """Tokens one timed forward processes: the whole prompt in prefill, one per sequence in decode."""
    return regime.batch * (regime.seq_len if regime.regime == "prefill" else 1)


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def peak_memory_bytes(model: Any, regime: Regime) -> dict[str, Any]:
    """Peak memory of one forward in the regime: CUDA allocator peak (exact), or on CPU weights + the largest
    rise of the resident set sampled every ~0.2 ms during the forward (approximate)."""
    import torch

    from zipkd.latency.measure import model_device, model_step

    device = model_device(model)
    weights = tensor_bytes(model)
    eager = Regime(**{**asdict(regime), "runtime": "eager"})
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.inference_mode():
            model_step(model, eager).time_once()  # a decode step's KV-cache prefill counts too
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "peak_bytes": weights + max(0, peak - base),
            "weights_bytes": weights,
            "activation_bytes": max(0, peak - base),
            "method": "cuda max_memory_allocated",
        }
    before = _rss()
    high = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            high[0] = max(high[0], _rss())
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with torch.inference_mode():
            model_step(model, eager).time_once()  # a decode step's KV-cache prefill counts too
    finally:
        stop.set()
        sampler.join()
    rise = max(0, high[0] - before)
    return {
        "peak_bytes": weights + rise,
        "weights_bytes": weights,
        "activation_bytes": rise,
        "method": "cpu resident-set sampling (approximate)",
    }


def measure_speed(
    models: list[Any], regime: Regime, warmup: int = 2, repeats: int = 7, memory: bool = True
) -> list[dict[str, Any]]:
    """Time `models` alternately in one run (`compare_ms`); one dict per model with median/p10/p90 ms,
    tokens/s and (optionally) peak memory."""
    from zipkd.latency.measure import compare_ms

    timings = compare_ms(models, regime, warmup=warmup, repeats=repeats)
    n_tokens = tokens_per_forward(regime)
    out = []
    for model, t in zip(models, timings, strict=True):
        row = {k: t[k] for k in ("median_ms", "p10_ms", "p90_ms", "repeats")}
        row["tokens_per_s"] = n_tokens / (t["median_ms"] / 1e3)
        if memory:
            row["memory"] = peak_memory_bytes(model, regime)
        out.append(row)
    return out
