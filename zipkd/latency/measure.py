"""End-to-end timing of model (or single-layer) forwards in a regime, with warm-up, repeats, medians and device
synchronisation.

Regimes (see `zipkd.latency.table.Regime`):
- prefill: one forward over `batch × seq_len` prompt tokens without a KV cache, computing logits for the last
  position only (`logits_to_keep=1`, as `generate` does on the prompt);
- decode: one forward of one new token per sequence over a KV cache already holding `context` tokens; the cache
  is restored to `context` tokens after every timed step (outside the timing), so each step sees the same state.

`compare_ms` times several models alternately, round by round (order rotated each round), so that drifts in
machine load hit every model alike and ratios between them are honest.
"""

from __future__ import annotations

import inspect
import math
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from zipkd.errors import ZipkdError
from zipkd.latency.table import Regime

_SEED = 1234


def _module(model: Any) -> torch.nn.Module:
    """Accept a LoadedModel or a bare module."""
    return model.model if hasattr(model, "model") and hasattr(model, "tokenizer") else model


def model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def synchronize(device: torch.device | str) -> None:
    """Wait for queued device work (no-op on CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":  # pragma: no cover - not in CI
        torch.mps.synchronize()


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name of the KV-cache argument: `cache` in transformers ≥ 5.2x, `past_key_values` before."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def snapshot_cache(cache: Any) -> list[tuple[Any, Any, Any]]:
    """Remember the key/value tensors of every cache layer (restored after each timed decode step)."""
    return [(layer, getattr(layer, "keys", None), getattr(layer, "values", None)) for layer in cache.layers]


def restore_cache(snapshot: list[tuple[Any, Any, Any]]) -> None:
    for layer, k, v in snapshot:
        layer.keys, layer.values = k, v


def random_ids(model: torch.nn.Module, batch: int, length: int, seed: int = _SEED) -> torch.Tensor:
    vocab = int(getattr(model.config, "vocab_size", 32000))
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).to(model_device(model))


class Step:
    """One timed unit of work: `run()` does it (timed), `reset()` restores state between runs (not timed).

    With `inner` > 1 a sample runs the work `inner` times back to back between two synchronisations and reports
    the mean: short GPU kernels are then timed as they run inside a model forward (launches overlapping
    execution) rather than dominated by one synchronisation each."""

    def __init__(
        self,
        run: Callable[[], Any],
        reset: Callable[[], None] | None = None,
        device: torch.device | str = "cpu",
        keep: Any = None,
    ):
        self.run = run
        self.reset = reset or (lambda: None)
        self.device = torch.device(device)
        self._keep = keep  # tensors the step reads and must outlive it (CUDA graphs)
        self.inner = 1

    def time_once(self) -> float:
        synchronize(self.device)
        t0 = time.perf_counter()
        for i in range(self.inner):
            if i:
                self.reset()
            self.run()
        synchronize(self.device)
        ms = (time.perf_counter() - t0) * 1e3 / self.inner
        self.reset()
        return ms

    def calibrate(self, min_ms: float) -> Step:
        """Choose `inner` so one sample lasts at least `min_ms` (at most 64 runs)."""
        with torch.inference_mode():
            self.time_once()
            one = self.time_once()
        self.inner = max(1, min(64, math.ceil(min_ms / max(one, 1e-3))))
        return self


def as_graph(step: Step) -> Step:
    """Capture a step into a CUDA graph (replayed with no Python or launch overhead)."""
    if step.device.type != "cuda":
        raise ZipkdError("the cudagraphs runtime needs a CUDA device")
    try:
        stream = torch.cuda.Stream(step.device)
        stream.wait_stream(torch.cuda.current_stream(step.device))
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):
                step.run()
                step.reset()
        torch.cuda.current_stream(step.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            step.run()
        step.reset()
    except ZipkdError:
        raise
    except Exception as exc:  # noqa: BLE001 - capture fails in many ways; say which and how to avoid it
        raise ZipkdError(
            f"CUDA graph capture failed ({type(exc).__name__}: {exc}); use --runtime eager"
        ) from exc
    graphed = Step(graph.replay, None, step.device, keep=(step, graph))
    graphed.inner = step.inner
    return graphed


def model_step(model: Any, regime: Regime, inputs: torch.Tensor | None = None) -> Step:
    """Prepare one model forward in the regime. `inputs`: prompt ids (prefill) or context ids (decode)."""
    model = _module(model)
    device = model_device(model)
    if regime.regime == "prefill":
        ids = inputs if inputs is not None else random_ids(model, regime.batch, regime.seq_len)
        ids = ids.to(device)

        def run() -> Any:
            return model(input_ids=ids, use_cache=False, logits_to_keep=1)

        step = Step(run, None, device)
    else:
        ctx = inputs if inputs is not None else random_ids(model, regime.batch, regime.context)
        ctx = ctx.to(device)
        new = random_ids(model, ctx.shape[0], 1, seed=_SEED + 1)
        with torch.inference_mode():
            out = model(input_ids=ctx, use_cache=True, logits_to_keep=1)
        cache = output_cache(out)
        if cache is None:
            raise ZipkdError(f"{type(model).__name__} returned no KV cache; cannot time decode")
        snap = snapshot_cache(cache)
        kw = {cache_kwarg(model): cache}

        def run() -> Any:
            return model(input_ids=new, use_cache=True, logits_to_keep=1, **kw)

        step = Step(run, lambda: restore_cache(snap), device, keep=(cache, snap))
    return as_graph(step) if regime.runtime == "cudagraphs" else step


def check_runtime(regime: Regime, device: torch.device | str) -> None:
    device = torch.device(device)
    if regime.runtime not in ("eager", "cudagraphs"):
        raise ZipkdError(
            f"runtime {regime.runtime!r} is not supported; choose eager (any device) or cudagraphs (CUDA)"
        )
    if regime.runtime == "cudagraphs" and device.type != "cuda":
        raise ZipkdError("--runtime cudagraphs needs a CUDA device; use --runtime eager on CPU")


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    s = sorted(samples)
    q = statistics.quantiles(s, n=10, method="inclusive") if len(s) > 1 else [s[0]] * 9
    return {
        "median_ms": statistics.median(s),
        "p10_ms": q[0],
        "p90_ms": q[-1],
        "repeats": len(s),
        "samples_ms": list(samples),
    }


def compare_steps(
    steps: Sequence[Step], warmup: int = 2, repeats: int = 7, callback: Callable[[], None] | None = None
) -> list[dict[str, Any]]:
    """Time prepared steps alternately: each round runs every step once, in an order rotated per round.
    `callback` is called after every timed run (progress bars)."""
    if repeats < 1 or warmup < 0:
        raise ZipkdError("repeats must be at least 1 and warmup at least 0")
    samples: list[list[float]] = [[] for _ in steps]
    n = len(steps)
    with torch.inference_mode():
        for r in range(warmup + repeats):
            for j in range(n):
                i = (j + r) % n
                ms = steps[i].time_once()
                if r >= warmup:
                    samples[i].append(ms)
                if callback is not None:
                    callback()
    return [summarize(s) for s in samples]


def compare_ms(
    models: Sequence[Any],
    regime: Regime,
    warmup: int = 2,
    repeats: int = 7,
    inputs: torch.Tensor | None = None,
) -> list[dict[str, Any]]:
    """Time several models alternately in one run (honest ratios under changing load); one dict per model:
    median_ms, p10_ms, p90_ms, repeats, samples_ms."""
    mods = [_module(m) for m in models]
    for m in mods:
        check_runtime(regime, model_device(m))
    steps = [model_step(m, regime, inputs) for m in mods]
    return compare_steps(steps, warmup, repeats)


def measure_ms(
    model: Any, regime: Regime, inputs: torch.Tensor | None = None, warmup: int = 2, repeats: int = 7
) -> dict[str, Any]:
    """End-to-end time of one model forward in the regime: median_ms, p10_ms, p90_ms, repeats, samples_ms."""
    return compare_ms([model], regime, warmup, repeats, inputs)[0]
