"""Build latency tables by timing one decoder layer at every shape the pruner may choose, on the target device.

Method (all timings alternate round by round, see `measure.compare_steps`):
- capture the exact arguments the model passes to a decoder layer in the regime (hidden states, rotary
  embeddings, mask; for decode also the step's position), with a forward pre-hook on a full-size layer;
- time copies of that layer sliced to each shape the table needs (below) and the dense layer T(K, W) as a
  reference in every round. Decode layers run over their own KV cache holding `context` tokens; on a GPU each
  sample runs the layer back to back, so kernel launches overlap execution as inside a forward;
- time the dense model end to end in the same rounds.

Model: a kept layer costs T(k, w) = c + A[k] + M[w] (A[0] = M[0] = 0), a dropped layer nothing. Two ways to
measure it:
- "blocks" (default on CPU, where blocks are compute-bound and add up): each block alone, T(k, 0) and T(0, w),
  and the empty layer c = T(0, 0); A[k] = T(k, 0) − c, M[w] = T(0, w) − c. Each entry is measured directly, so
  its noise is a fraction of its own size (small widths stay accurate on a busy CPU).
- "anchored" (default for GPU prefill): inside the dense layer, T(k, W) and T(K, w); A[k] = T(k, W) − T(0, W),
  M[w] = T(K, w) − T(K, 0), c = T(0, W) + T(K, 0) − T(K, W). Exact at every measured shape even where blocks do
  not add up (on a GPU the CPU launches one block while the other computes, so a layer costs less than its blocks
  timed alone); entries are differences of dense-layer-sized times, fine on a quiet GPU.
- "in-model" (default for GPU decode): the anchored shapes, each timed as a whole model whose every layer has
  that shape (`uniform_model`, sharing everything but the layers), alternating with the dense model and the rest;
  a layer's T(k, w) = (model − rest) / L. Costs one forward of the model per shape, but includes what one layer
  timed alone cannot: at small-batch GPU decode a layer's kernels are shorter than their launches, which overlap
  the neighbouring layers' work, so narrowing a layer saves far less in the model than alone.
Entries fold c in, half into each kept block (attention[k] = A[k] + c/2, mlp[w] = M[w] + c/2, both 0 when
removed), so attention + mlp alone is right for layers that keep both blocks and for dropped ones; the table's
`layer_overhead_ms` = c lets `layer_ms` add the missing c/2 to a layer that keeps one block. `rest` is timed
directly (the model with its layers taken out: embeddings, rotary and mask set-up, final norm, lm_head, call
overheads), and the layer entries are scaled by (dense end-to-end − rest) / (L × dense layer) so the table
reproduces the dense model's measured latency: layers inside the model run slightly slower or faster than one
layer timed alone, and that difference grows and shrinks with the layers kept.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache

from zipkd.errors import ZipkdError
from zipkd.latency.measure import (
    Step,
    _module,
    as_graph,
    check_runtime,
    compare_steps,
    model_device,
    model_step,
    restore_cache,
    snapshot_cache,
)
from zipkd.latency.runtimes import module_quantizer, runtime_for
from zipkd.latency.table import DEVICE_KEYS, MODEL_KEYS, LatencyTable, Regime, check_device
from zipkd.manifest import cpu_model
from zipkd.models.adapters import adapter_for
from zipkd.models.io import torch_dtype
from zipkd.models.surgery import (
    base_geometry,
    kv_heads_of,
    remove_attention,
    remove_mlp,
    slice_attention,
    slice_mlp,
    width_of,
)
from zipkd.paths import cache_dir

PROFILER_VERSION = 5  # part of the cache key: bump when the method changes
METHODS = ("blocks", "anchored", "in-model")
EXTRA_DEVICE_KEYS = ("driver", "runtime", "quantization", "llama_cpp")
GPU_SAMPLE_MS = 3.0  # a GPU layer-timing sample runs the layer back to back for at least this long


# ---------------------------------------------------------------- fingerprints


def parse_device(device: str) -> torch.device:
    """Validate a device string: `cpu`, `cuda` or `cuda:N` (the GPU must exist)."""
    dev = torch.device(check_device(device))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ZipkdError(
                "CUDA was asked for but no GPU is available here (torch.cuda.is_available() is False)"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ZipkdError(f"{device} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return dev


def model_fingerprint(config: Any) -> dict[str, Any]:
    """Shape of the *base* architecture (a pruned model's base, so its table is the base model's)."""
    adapter_for(config)
    geo = base_geometry(config)
    return {
        "architecture": config.model_type,
        "hidden_size": geo.hidden_size,
        "num_layers": geo.num_layers,
        "num_heads": geo.num_heads,
        "num_kv_heads": geo.num_kv_heads,
        "head_dim": geo.head_dim,
        "intermediate_size": geo.intermediate_size,
        "vocab_size": int(getattr(config, "vocab_size", 0)),
    }


def device_fingerprint(regime: Regime, strict: bool = True) -> dict[str, Any]:
    """Where the table is measured: device type and name (CPU model or GPU), driver, threads, torch version,
    dtype, runtime and quantization. `strict=False` describes an absent CUDA device by its type only."""
    runtime = runtime_for(regime.runtime)
    if not runtime.torch:
        return runtime.impl().fingerprint(regime)
    fp: dict[str, Any] = {
        "device": None,
        "device_name": None,
        "torch": torch.__version__,
        "dtype": regime.dtype,
        "threads": None,
        "runtime": regime.runtime,
        "quantization": regime.quantization,
    }
    try:
        dev = parse_device(regime.device)
    except ZipkdError:
        if strict:
            raise
        fp["device"] = str(regime.device).split(":")[0]
        return fp
    fp["device"] = dev.type
    if dev.type == "cuda":
        fp["device_name"] = torch.cuda.get_device_name(dev)
        fp["cuda"] = torch.version.cuda
        fp["driver"] = _driver_version()
        fp["cpu"] = cpu_model()
    else:
        fp["device_name"] = cpu_model()
        fp["threads"] = torch.get_num_threads()
        # Informational (not a mismatch key, but part of the cache key): sleeping vs spinning OpenMP threads.
        fp["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")
    return fp


def _driver_version() -> str | None:
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, IndexError, Exception):  # noqa: BLE001 - best effort
        return None


def table_mismatch(table: LatencyTable, config: Any, regime: Regime) -> list[str]:
    """Why a table does not fit this model and target device ([] = it fits)."""
    here = {**model_fingerprint(config), **device_fingerprint(regime, strict=True)}
    return table.mismatch(here, MODEL_KEYS + DEVICE_KEYS + EXTRA_DEVICE_KEYS)


# ---------------------------------------------------------------- grids


def mlp_grid(intermediate: int, device_type: str = "cpu", max_levels: int = 32) -> list[int]:
    """MLP widths to time: 0 (removed), multiples of an aligned step (64 on CPU, 128 on GPU, doubled until at
    most `max_levels` widths), and the full width."""
    if intermediate < 1:
        raise ZipkdError("the model has no MLP width to profile")
    step = 128 if device_type == "cuda" else 64
    while intermediate // step > max_levels:
        step *= 2
    widths = {0, intermediate, *range(step, intermediate, step)}
    if intermediate < 4 * step:  # tiny models: also a few evenly spread widths
        widths |= {max(1, intermediate * i // 4) for i in range(1, 4)}
    return sorted(widths)


# ---------------------------------------------------------------- layer timing


def _full_layer(model: torch.nn.Module) -> tuple[int, torch.nn.Module]:
    ad = adapter_for(model.config)
    geo = base_geometry(model.config)
    for i, layer in enumerate(ad.layers(model)):
        if (
            kv_heads_of(layer, ad, geo.head_dim) == geo.num_kv_heads
            and width_of(layer, ad) == geo.intermediate_size
        ):
            return i, layer
    raise ZipkdError(
        "no full-size decoder layer in this model: profile the unpruned base model (a pruned "
        "model's predictions come from its base model's table)"
    )


def capture_layer_inputs(
    model: torch.nn.Module, layer: torch.nn.Module, regime: Regime
) -> tuple[torch.Tensor, dict]:
    """Run the model once in the regime and return the (hidden_states, kwargs) it passes to `layer` (the decode
    step's, for decode)."""
    seen: list[tuple[tuple, dict]] = []

    def hook(_mod: Any, args: tuple, kwargs: dict) -> None:
        seen.append((args, dict(kwargs)))

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        step = model_step(model, regime.__class__(**{**asdict(regime), "runtime": "eager"}))
        with torch.inference_mode():
            step.run()
        step.reset()
    finally:
        handle.remove()
    if not seen:
        raise ZipkdError("the model never called its decoder layer; cannot profile it")
    args, kwargs = seen[-1]
    hidden = args[0] if args else kwargs.pop("hidden_states")
    for key in ("cache", "past_key_values"):
        if key in kwargs:
            kwargs[key] = None
    return hidden, kwargs


def layer_variant(layer: torch.nn.Module, config: Any, kv_heads: int, width: int) -> torch.nn.Module:
    """A copy of a full-size layer with the first `kv_heads` KV groups and `width` MLP channels (0 = removed)."""
    ad = adapter_for(config)
    geo = base_geometry(config)
    new = copy.deepcopy(layer)
    if kv_heads == 0:
        remove_attention(new, ad)
    else:
        if kv_heads < geo.num_kv_heads:
            slice_attention(new, ad, geo.head_dim, geo.group_size, list(range(kv_heads)))
        attn = ad.attention(new)
        attn.layer_idx = 0
        if hasattr(attn, "num_key_value_groups"):
            attn.num_key_value_groups = geo.group_size
    if width == 0:
        remove_mlp(new, ad)
    elif width < geo.intermediate_size:
        slice_mlp(new, ad, torch.arange(width))
    return new.eval()


def layer_step(
    layer: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, regime: Regime, config: Any, kv_heads: int
) -> Step:
    """One forward of a single layer in the regime; for decode over its own KV cache of `context` tokens."""
    device = hidden.device
    kw = dict(kwargs)
    reset = None
    keep = None
    if regime.regime == "decode":
        geo = base_geometry(config)
        cache = DynamicCache()
        if kv_heads:
            shape = (hidden.shape[0], kv_heads, regime.context, geo.head_dim)
            g = torch.Generator(device=device).manual_seed(0)
            k = torch.randn(shape, generator=g, device=device, dtype=hidden.dtype)
            v = torch.randn(shape, generator=g, device=device, dtype=hidden.dtype)
            cache.update(k, v, 0)
        snap = snapshot_cache(cache)
        key = "cache" if "cache" in kw else "past_key_values" if "past_key_values" in kw else None
        if key is not None:
            kw[key] = cache
        reset, keep = (lambda: restore_cache(snap)), (cache, snap)

    def run() -> Any:
        return layer(hidden, **kw)

    step = Step(run, reset, device, keep=keep)
    step = as_graph(step) if regime.runtime == "cudagraphs" else step
    # On a GPU a layer takes well under a millisecond: time it back to back, as it runs inside the model.
    return step.calibrate(GPU_SAMPLE_MS) if device.type == "cuda" else step


def block_entries(
    T: dict[tuple[int, int], float],
    num_kv_heads: int,
    intermediate: int,
    widths: Sequence[int],
    method: str = "blocks",
) -> tuple[dict[int, float], dict[int, float], float]:
    """Per-block entries from single-layer times T[(k, w)] (k KV heads, w MLP width). "blocks" needs (k, 0) for
    k = 0..K and (0, w) for every width; "anchored" needs (k, W) for k = 0..K and (K, w) for every width (0
    included). Returns (attention_ms, mlp_ms, c) as in the module docstring: removed blocks 0, kept ones
    carrying c/2 each. Pure."""
    K, W = num_kv_heads, intermediate
    if method == "blocks":
        c = T[(0, 0)]
        A = {k: T[(k, 0)] - c for k in range(1, K + 1)}
        M = {w: T[(0, w)] - c for w in widths if w > 0}
    elif method == "anchored":
        c = T[(0, W)] + T[(K, 0)] - T[(K, W)]
        A = {k: T[(k, W)] - T[(0, W)] for k in range(1, K + 1)}
        M = {w: T[(K, w)] - T[(K, 0)] for w in widths if w > 0}
    else:
        raise ZipkdError(f"unknown profiling method {method!r}; choose {' or '.join(METHODS)}")
    return (
        {0: 0.0, **{k: v + c / 2 for k, v in A.items()}},
        {0: 0.0, **{w: v + c / 2 for w, v in M.items()}},
        c,
    )


def without_layers(model: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of the model with no decoder layers (sharing every other module): what a forward costs
    besides its layers — embeddings, rotary and mask set-up, final norm, lm_head, call overheads."""
    return with_layers(model, [])


def uniform_model(model: torch.nn.Module, kv_heads: int, width: int) -> torch.nn.Module:
    """A shallow copy of the (unpruned) model sharing everything but its decoder layers, each replaced by a copy
    keeping `kv_heads` KV groups and `width` MLP channels (0 = block removed); attention layer indices kept."""
    ad = adapter_for(model.config)
    layers = []
    for i, layer in enumerate(ad.layers(model)):
        new = layer_variant(layer, model.config, kv_heads, width)
        if kv_heads:
            ad.attention(new).layer_idx = i
        layers.append(new)
    return with_layers(model, layers)


def with_layers(model: torch.nn.Module, layers: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """A shallow copy of the model whose decoder-layer list is `layers` (every other module shared)."""
    ad = adapter_for(model.config)
    parts = ad.layers_path.split(".")
    root = copy.copy(model)
    root._modules = dict(model._modules)
    parent = root
    for name in parts[:-1]:
        child = copy.copy(getattr(parent, name))
        child._modules = dict(child._modules)
        parent._modules[name] = child
        parent = child
    parent._modules[parts[-1]] = torch.nn.ModuleList(layers)
    return root


def _nbytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _check_model(model: torch.nn.Module, regime: Regime) -> torch.device:
    dev = parse_device(regime.device)
    have = model_device(model)
    if have.type != dev.type or (dev.index is not None and have.index != dev.index):
        raise ZipkdError(f"the model is on {have} but the regime asks for {regime.device}; load it there")
    dtype = torch_dtype(regime.dtype)
    p = next(model.parameters())
    if p.dtype != dtype and regime.quantization is None:
        raise ZipkdError(
            f"the model is in {str(p.dtype).removeprefix('torch.')} but the regime asks for "
            f"{regime.dtype}; load it in that dtype"
        )
    check_runtime(regime, have)
    return have


def _memory_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.3)
    return 2 << 30


def default_method(device: torch.device, regime: Regime) -> str:
    """ "blocks" on CPU; on a GPU "anchored" for prefill and "in-model" for decode, where a layer's kernels are
    so short that its cost is mostly launches overlapping the neighbouring layers' work (one layer timed alone,
    even back to back, misses that: 64% median error on an H200 at batch-16 decode, see BENCHMARKS.md)."""
    if device.type != "cuda":
        return "blocks"
    return "in-model" if regime.regime == "decode" else "anchored"


def profile_model(
    lm: Any,
    regime: Regime,
    progress: Any = None,
    warmup: int = 2,
    repeats: int = 9,
    max_levels: int = 32,
    widths: Sequence[int] | None = None,
    method: str | None = None,
) -> LatencyTable:
    """Measure a latency table for this (unpruned) model on the regime's device. `lm`: LoadedModel or module
    (already on the device, in the regime's dtype). `method`: "blocks" (each block timed alone; default on CPU),
    "anchored" (timed inside the dense layer; default for GPU prefill) or "in-model" (whole models whose every
    layer has the shape; default for GPU decode), see the module docstring and `default_method`."""
    t_start = time.perf_counter()
    model = _module(lm).eval()
    config = model.config
    device = _check_model(model, regime)
    method = method or default_method(device, regime)
    if method not in METHODS:
        raise ZipkdError(f"unknown profiling method {method!r}; choose {', '.join(METHODS)}")
    fingerprint = {**model_fingerprint(config), **device_fingerprint(regime)}

    geo = base_geometry(config)
    K, W, L = geo.num_kv_heads, geo.intermediate_size, geo.num_layers
    grid = sorted(set(widths) | {0, W}) if widths is not None else mlp_grid(W, device.type, max_levels)
    if any(w < 0 or w > W for w in grid):
        raise ZipkdError(f"MLP widths must lie in 0..{W}")
    quantize = module_quantizer(regime.quantization)

    _, base_layer = _full_layer(model)
    hidden, kwargs = capture_layer_inputs(model, base_layer, regime)

    dense_model = model
    if quantize is not None:
        dense_model = quantize(copy.deepcopy(model), regime.quantization, str(device))

    # (kv_heads, width) shapes to time around the dense layer T(K, W), which every chunk also times as reference.
    in_model = method == "in-model"
    if method == "blocks":
        specs = [(k, 0) for k in range(K + 1)] + [(0, w) for w in grid if w > 0]
    else:
        specs = [(k, W) for k in range(K)] + [(K, w) for w in grid if w < W]
    # Alignment probe: a grid width near W/2 and the same plus one (why the grid avoids such widths).
    probe = min((w for w in grid if 0 < w < W), key=lambda w: abs(w - W / 2), default=W)
    if probe + 1 < W and probe + 1 not in grid:
        specs.append((0, probe + 1) if method == "blocks" else (K, probe + 1))
    budget = _memory_budget(device)
    kv_bytes = 2 * hidden.shape[0] * regime.context * geo.head_dim * hidden.element_size()
    decode = regime.regime == "decode"
    est = {
        (k, w): (L if in_model else 1) * (_nbytes(base_layer) * (k / K + w / W) / 2 + decode * k * kv_bytes)
        + 1
        for k, w in specs
    }
    chunks: list[list[tuple[int, int]]] = [[]]
    used = 0.0
    for spec in specs:
        if chunks[-1] and used + est[spec] > budget:
            chunks.append([])
            used = 0.0
        chunks[-1].append(spec)
        used += est[spec]

    task = None
    if progress is not None:
        total = sum((len(c) + (2 if in_model else 3)) * (warmup + repeats) for c in chunks)
        task = progress.add_task(f"profiling {regime.regime} on {device.type}", total=total)

    def tick() -> None:
        if progress is not None:
            progress.advance(task)

    e2e_step = model_step(dense_model, regime)
    rest_step = model_step(without_layers(dense_model), regime)
    rest_samples: list[float] = []
    results: dict[tuple[int, int], float] = {}
    ref: list[float] = []  # dense-layer medians per chunk, to put chunks on one scale
    e2e_samples: list[float] = []
    for chunk in chunks:
        if in_model:
            # Whole models with every layer at the shape, timed with the dense model and the rest: a layer costs
            # (model − rest) / L, including whatever overlaps between layers (launch-bound GPU decode).
            variants = [uniform_model(model, k, w) for k, w in chunk]
            if quantize is not None:
                variants = [quantize(v, regime.quantization, str(device)) for v in variants]
            stats = compare_steps(
                [e2e_step, rest_step, *[model_step(v, regime) for v in variants]],
                warmup,
                repeats,
                callback=tick,
            )
            e2e_samples += stats[0]["samples_ms"]
            rest_samples += stats[1]["samples_ms"]
            rest_med = stats[1]["median_ms"]
            ref.append((stats[0]["median_ms"] - rest_med) / L)
            for spec, st in zip(chunk, stats[2:], strict=True):
                results[spec] = ((st["median_ms"] - rest_med) / L, len(ref) - 1)
            del variants, stats
            continue
        shapes = [(K, W), *chunk]
        layers = [layer_variant(base_layer, config, k, w) for k, w in shapes]
        if quantize is not None:
            layers = [
                quantize(layer, regime.quantization, str(device)) if k or w else layer
                for layer, (k, w) in zip(layers, shapes, strict=True)
            ]
        steps = [e2e_step, rest_step] + [
            layer_step(layer, hidden, kwargs, regime, config, k)
            for layer, (k, _) in zip(layers, shapes, strict=True)
        ]
        stats = compare_steps(steps, warmup, repeats, callback=tick)
        e2e_samples += stats[0]["samples_ms"]
        rest_samples += stats[1]["samples_ms"]
        ref.append(stats[2]["median_ms"])
        for spec, st in zip(chunk, stats[3:], strict=True):
            results[spec] = (st["median_ms"], len(ref) - 1)
        del layers, steps
    dense_layer = float(torch.tensor(ref).median())
    # Chunks measured at different moments: rescale each chunk by its own dense-layer reference.
    T = {spec: ms * dense_layer / ref[i] for spec, (ms, i) in results.items()}
    T[(K, W)] = dense_layer
    attention_ms, mlp_ms, overhead = block_entries(T, K, W, grid, "anchored" if in_model else method)
    negative = sorted(f"attention {k}" for k, v in attention_ms.items() if v < 0) + sorted(
        f"mlp {w}" for w, v in mlp_ms.items() if v < 0
    )
    if negative:  # only noise makes a block cheaper than nothing; a pruner must not be paid to keep it
        attention_ms = {k: max(v, 0.0) for k, v in attention_ms.items()}
        mlp_ms = {w: max(v, 0.0) for w, v in mlp_ms.items()}
    e2e = float(torch.tensor(e2e_samples).median())
    rest = float(torch.tensor(rest_samples).median())
    # Whatever the dense model spends beyond its measured rest and L isolated layers is spent in its layers
    # (in-model layers run a little slower or faster than one layer timed alone): scale the entries to match.
    layers_ms = L * (attention_ms[K] + mlp_ms[W])  # 0 when noise clamped both dense blocks
    scale = (e2e - rest) / layers_ms if layers_ms > 0 else 0.0
    if not 0.0 < scale < float("inf"):
        raise ZipkdError(f"inconsistent timings (dense {e2e:.3f} ms, rest {rest:.3f} ms); profile again")
    attention_ms = {k: v * scale for k, v in attention_ms.items()}
    mlp_ms = {w: v * scale for w, v in mlp_ms.items()}
    overhead *= scale
    predicted_layer = attention_ms[K] + mlp_ms[W]
    probe_key, base = ((0, probe + 1), (0, 0)) if method == "blocks" else ((K, probe + 1), (K, 0))
    probe_ms = T[probe_key] - T[base] + overhead / 2 if probe_key in T else None
    meta = {
        "profiler_version": PROFILER_VERSION,
        "method": method,
        "additivity_error": predicted_layer / dense_layer - 1,
        "prefill_logits": "last position only (logits_to_keep=1)",
        "warmup": warmup,
        "repeats": repeats,
        "chunks": len(chunks),
        "dense_layer_ms": dense_layer,
        "layer_overhead_fraction": overhead / dense_layer,
        "rest_fraction": rest / e2e,
        "in_model_scale": scale,
        "alignment_probe": {
            "width": probe,
            "mlp_ms": mlp_ms[probe],
            "width_plus_1": probe + 1,
            "mlp_ms_plus_1": probe_ms,
        },
        "layer_ms": {f"{k},{w}": v for (k, w), v in sorted(T.items())},
        "build_s": round(time.perf_counter() - t_start, 2),
    }
    warnings = []
    if regime.device == "cpu" and hasattr(os, "getloadavg"):
        # A table measured on a busy CPU describes that load, not the machine: under contention the blocks'
        # relative costs shift (a table profiled at load 10 on 2 cores over-predicted width cuts by 12-15%
        # once the machine was quiet). Record the load and say so.
        load = os.getloadavg()[0]
        meta["load_average"] = round(load, 2)
        cores = os.cpu_count() or 1
        if load > 1.5 * cores:
            warnings.append(
                f"the CPU was busy while profiling (load average {load:.1f} on {cores} cores): other jobs shift "
                "the blocks' relative costs; re-measure on a quiet machine with `zipkd profile --remeasure`"
            )
    if negative:
        warnings.append(f"negative entries clamped to 0 ({', '.join(negative)}): timings were very noisy")
    if not 0.8 < scale < 1.25:
        warnings.append(f"layers in the model ran {scale:.2f}x their isolated time: timings were noisy")
    if warnings:
        meta["warning"] = "; ".join(warnings)
    return LatencyTable(
        regime=regime,
        fingerprint=fingerprint,
        rest_ms=rest,
        attention_ms=attention_ms,
        mlp_ms=mlp_ms,
        num_layers=L,
        measured_dense_ms=e2e,
        meta=meta,
        layer_overhead_ms=overhead,
    )


# ---------------------------------------------------------------- cache


def table_cache_path(config: Any, regime: Regime, method: str | None = None) -> Path:
    """Where the table for this model, device and regime is cached (under cache_dir()/tables); a `method` other
    than the device's default (see `default_method`) is cached apart."""
    mfp = model_fingerprint(config)
    dfp = device_fingerprint(regime)
    reg = asdict(regime)
    runtime = runtime_for(regime.runtime)
    if runtime.torch:  # fields torch tables never had keep their cache keys as they were
        for key in ("threads", "decode_tokens"):
            reg.pop(key)
    else:
        method = None  # one method per engine runtime
    fields = {"model": mfp, "device": dfp, "regime": reg, "v": PROFILER_VERSION}
    if not runtime.torch:
        fields["engine_v"] = getattr(runtime.impl(), "PROFILER_VERSION", 0)
    suffix = "" if runtime.torch else f"-{regime.runtime}-{regime.quantization}"
    if method is not None and method != default_method(parse_device(regime.device), regime):
        fields["method"] = method
        suffix += f"-{method}"
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    name = (
        f"{mfp['architecture']}-h{mfp['hidden_size']}-l{mfp['num_layers']}-{dfp['device']}-{regime.regime}"
        f"-b{regime.batch}{suffix}-{digest}.json"
    )
    return cache_dir() / "tables" / name


def check_table(table: LatencyTable, lm: Any, regime: Regime, accept_mismatch: bool = False) -> LatencyTable:
    """Refuse a table measured for another model or device (unless `accept_mismatch`), naming the
    differences; a table whose grid cannot describe this model (other layer count, other dense KV heads or MLP
    width) is refused even then."""
    return check_table_config(table, _module(lm).config, regime, accept_mismatch)


def check_table_config(
    table: LatencyTable, config: Any, regime: Regime, accept_mismatch: bool = False
) -> LatencyTable:
    """`check_table` from the model's config alone (an object with the config.json fields), so a table can be
    refused before any weights load."""
    geo = base_geometry(config)
    shape = []
    if table.num_layers != geo.num_layers:
        shape.append(f"{table.num_layers} layers, the model has {geo.num_layers}")
    if max(table.attention_ms) != geo.num_kv_heads:
        shape.append(f"up to {max(table.attention_ms)} KV heads, the model has {geo.num_kv_heads}")
    if max(table.mlp_ms) != geo.intermediate_size:
        shape.append(f"MLP width up to {max(table.mlp_ms)}, the model has {geo.intermediate_size}")
    if shape:
        raise ZipkdError(
            f"the latency table describes another model ({'; '.join(shape)}), even with --force-table; "
            "profile this model with `zipkd profile`"
        )
    problems = table_mismatch(table, config, regime)
    if problems and not accept_mismatch:
        raise ZipkdError(
            "latency table does not match this model/device ("
            + "; ".join(problems)
            + "); profile again, or pass --force-table to use it anyway"
        )
    return table


def load_or_profile(
    lm: Any,
    regime: Regime,
    table: LatencyTable | str | Path | None = None,
    accept_mismatch: bool = False,
    progress: Any = None,
    method: str | None = None,
    repeats: int = 9,
    remeasure: bool = False,
) -> LatencyTable:
    """A given table (checked against the model/device; `accept_mismatch` takes one measured for another
    device or model of the same shape), else the cached table for this model+device+regime(+method) unless
    `remeasure`, else a freshly measured one (cached). `method`, `repeats`: see `profile_model` (default
    method: the device's, `default_method`)."""
    if table is not None:
        tab = table if isinstance(table, LatencyTable) else LatencyTable.load(table)
        return check_table(tab, lm, regime, accept_mismatch)
    model = _module(lm)
    path = table_cache_path(model.config, regime, method)
    if path.is_file() and not remeasure:
        try:
            tab = LatencyTable.load(path)
            if not table_mismatch(tab, model.config, regime):
                tab.meta["cache_path"] = str(path)
                tab.meta["cached"] = True
                return tab
        except ZipkdError:
            pass  # unreadable or outdated cache entry: measure again
    runtime = runtime_for(regime.runtime)
    if runtime.torch:
        tab = profile_model(lm, regime, progress=progress, repeats=repeats, method=method)
    else:
        tab = runtime.impl().profile(lm, regime, progress=progress, repeats=min(repeats, 5), method=method)
    path.parent.mkdir(parents=True, exist_ok=True)
    tab.save(path)
    tab.meta["cache_path"] = str(path)
    tab.meta["cached"] = False
    return tab
