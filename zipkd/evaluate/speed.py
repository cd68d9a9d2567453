"""Measured speed, size and memory of models in one regime.

Latency comes from `zipkd.latency.measure.compare_ms`: every model (the base and its compressed versions) is
timed alternately in the same run, so load changes on the machine hit them alike; we report medians and
tokens/s. Size: parameter count and weight-file bytes on disk. Peak memory: the weights plus the most memory
one forward in the regime allocates (CUDA allocator high-water mark; on CPU torch's allocations as the
profiler records them)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
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


@contextlib.contextmanager
def _quiet_stderr_fd() -> Iterator[None]:
    """The profiler's C++ side prints start/stop lines on file descriptor 2; keep them off the terminal."""
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_allocation_peak(run: Any) -> int:
    """Peak bytes held by torch's CPU allocator while `run()` executes, above what was held before: the
    profiler's memory events carry the running total of allocations made under it."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr_fd(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text()).get("traceEvents", [])
    totals = [
        e["args"].get("Total Allocated", 0)
        for e in events
        if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0
    ]
    return max([0, *totals])


def peak_memory_bytes(model: Any, regime: Regime) -> dict[str, Any]:
    """Peak memory to run the regime once: the weights plus the largest amount of memory the forward (for
    decode: the prefill of its KV cache, then one step) allocates on top. CUDA: the allocator's high-water
    mark; CPU: torch's CPU allocations recorded by the profiler."""
    import torch

    from zipkd.latency.measure import model_device, model_step

    device = model_device(model)
    weights = tensor_bytes(model)
    eager = Regime(**{**asdict(regime), "runtime": "eager"})

    def run() -> None:
        with torch.inference_mode():
            model_step(model, eager).time_once()

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        rise = max(0, torch.cuda.max_memory_allocated(device) - base)
        method = "cuda max_memory_allocated"
    else:
        rise = _cpu_allocation_peak(run)
        method = "torch CPU allocations (profiler)"
    return {
        "peak_bytes": weights + rise,
        "weights_bytes": weights,
        "activation_bytes": rise,
        "method": method,
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


def measure_speed_llamacpp(
    paths: list[Any], regime: Regime, warmup: int = 2, repeats: int = 7
) -> list[dict[str, Any]]:
    """Time GGUF files in llama.cpp round-robin (`zipkd.runtimes.llamacpp.compare`: every round times each
    model once, so load changes hit them alike), both regimes in each round: prefill of `seq_len` tokens and
    decode of `decode_tokens` tokens after a `context`-token prompt (ms per token). One dict per model: the
    regime's median/p10/p90 ms and tokens/s (what measured speedup and the gate use), and `regimes` with both."""
    from zipkd.latency.measure import summarize
    from zipkd.runtimes.llamacpp import compare, context_size, open_model, time_decode, time_prefill

    seq_len, context, tokens = regime.seq_len, regime.context, regime.decode_tokens
    n_ctx = max(
        context_size("prefill", seq_len, context, tokens), context_size("decode", seq_len, context, tokens)
    )
    n_batch = min(n_ctx, max(seq_len, context, 32))
    models = []
    try:
        for path in paths:
            models.append(open_model(path, threads=regime.threads, n_ctx=n_ctx, n_batch=n_batch))

        def measure(em: Any) -> tuple[float, float]:
            return time_prefill(em, seq_len), time_decode(em, context, tokens)

        samples = compare(models, measure, warmup=warmup, repeats=repeats)
    finally:
        for em in models:
            em.close()
    keys = ("median_ms", "p10_ms", "p90_ms", "repeats")
    out = []
    for s in samples:
        prefill = {k: v for k, v in summarize([a for a, _ in s]).items() if k in keys}
        prefill.update(tokens_per_s=seq_len / (prefill["median_ms"] / 1e3), batch=1, seq_len=seq_len)
        decode = {k: v for k, v in summarize([b for _, b in s]).items() if k in keys}
        decode.update(tokens_per_s=1e3 / decode["median_ms"], batch=1, context=context, tokens=tokens)
        regimes = {"prefill": prefill, "decode": decode}
        row = {k: regimes[regime.regime][k] for k in (*keys, "tokens_per_s")}
        row.update(runtime="llama.cpp", threads=regime.threads, regime=regime.regime, regimes=regimes)
        out.append(row)
    return out
