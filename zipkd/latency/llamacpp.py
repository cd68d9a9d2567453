"""Latency tables measured in llama.cpp: the layouts the pruner may choose, written as GGUF models with random
weights (speed does not depend on the values), quantized with llama.cpp's quantizer to the regime's type, and
timed as whole models ("in-model": what a layer costs inside a real forward, threads, caches and all).

Each shape is timed as a model whose every layer has it, exactly as `zipkd export` would write it (the same
stubs, see `zipkd.export.gguf`), round-robin with the dense model in chunks (each chunk's times are rescaled by
its own dense time, so drifts in machine load between chunks cancel). With t(k, w) = (T(k, w) − rest) / L the
per-layer time of the model whose every layer keeps k KV groups and MLP width w, the entries are anchored at the
dense layer, as `zipkd.latency.profile.block_entries` does for GPU decode: A[k] = t(k, W) − t(0, W),
M[w] = t(K, w) − t(K, 0), c = t(0, W) + t(K, 0) − t(K, W), so the table is exact at every measured shape. On a
CPU blocks do not simply add up: a decode step streams the weights through a 32 MiB L3, and a model whose
footprint fits in it runs faster per byte; anchoring at the dense layer measures each block where it runs.
`rest` (embeddings, output head, graph overheads) comes from a dense model of half the depth, H = L // 2 layers:
R = rest + H·t(K, W), so rest = (L·R − H·T(K, W)) / (L − H). A one-layer model would extrapolate from a model
whose weights fit in the caches (at prefill 1x512 on the 2-core CPU it ran a layer at half the cost of a layer in
the 30-layer model, giving a negative rest); half depth anchors where pruned models are."""

from __future__ import annotations

import os
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from zipkd.errors import ZipkdError
from zipkd.export.gguf import choose_arch, hparams, plan_layers, random_tensors, read_vocab, write_gguf
from zipkd.latency.profile import block_entries, mlp_grid, model_fingerprint
from zipkd.latency.table import LatencyTable, Regime
from zipkd.latency.validate import ValidationReport, VariantResult, random_shapes, spread_targets
from zipkd.manifest import cpu_model
from zipkd.models.adapters import adapter_for
from zipkd.models.surgery import base_geometry, layer_shapes
from zipkd.runtimes.llamacpp import (
    build_info,
    compare,
    context_size,
    default_threads,
    llama_cpp_module,
    open_model,
    parse_ftype,
    quantize_gguf,
    timer,
)

PROFILER_VERSION = 3
CHUNK = 8  # models open and timed round-robin at once (dense included)


def scratch_dir() -> Path:
    """Where the timing models are written: RAM-backed /dev/shm when it exists (no disk traffic)."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def fingerprint(regime: Regime) -> dict[str, Any]:
    """Where a llama.cpp table was measured: CPU, threads, llama.cpp build, quantization type."""
    info = build_info()
    return {
        "device": "cpu",
        "device_name": cpu_model(),
        "torch": None,
        "dtype": None,
        "threads": regime.threads or default_threads(),
        "runtime": "llama.cpp",
        "quantization": parse_ftype(regime.quantization),
        "llama_cpp": info["llama_cpp_python"],
        "llama_cpp_system": info["llama_cpp_system"],
    }


def check_regime(regime: Regime) -> None:
    if str(regime.device).split(":")[0] != "cpu":
        raise ZipkdError("--runtime llama.cpp runs on the CPU here; use --device cpu")
    if regime.batch != 1:
        raise ZipkdError("--runtime llama.cpp times one sequence (batch 1)")
    parse_ftype(regime.quantization)
    llama_cpp_module()


class ModelBuilder:
    """Writes timing GGUFs of a model's architecture at any per-layer shapes, quantized to one type."""

    def __init__(self, lm: Any, regime: Regime, folder: Path):
        model = lm.model if hasattr(lm, "model") else lm
        cfg = model.config
        self.family = adapter_for(cfg).family
        self.geo = base_geometry(cfg)
        self.hp = hparams(cfg)
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.biases = bool(getattr(cfg, "attention_bias", False)) or self.family == "qwen2"
        self.qk_norm = self.family == "qwen3"
        self.folder = folder
        self.quantization = regime.quantization
        self.threads = regime.threads
        self.vocab = None
        tok = getattr(lm, "tokenizer", None)
        if tok is not None:
            tok.save_pretrained(folder / "tokenizer")
            self.vocab = read_vocab(folder / "tokenizer", self.hp.vocab_size)
            self.vocab.pre = "default"  # timing only: the token ids are given, never tokenized
        self.count = 0

    def build(self, shapes: Sequence[tuple[int, int]]) -> Path:
        layers = plan_layers(
            [{"kv_heads": k, "intermediate": w} for k, w in shapes], self.geo.group_size, self.geo.num_heads
        )
        arch = choose_arch(self.family, layers)
        self.count += 1
        f32 = self.folder / f"m{self.count}-src.gguf"
        tensors = random_tensors(self.hp, layers, self.tied, self.biases, self.qk_norm)
        direct = parse_ftype(self.quantization) in ("f32", "f16")
        write_gguf(f32, arch, self.hp, layers, tensors, self.vocab, f16=self.quantization != "f32")
        if direct:
            return f32
        out = quantize_gguf(f32, self.folder / f"m{self.count}.gguf", self.quantization, self.threads)
        f32.unlink()
        return out


def _open(path: Path, regime: Regime):
    n_ctx = context_size(regime.regime, regime.seq_len, regime.context, regime.decode_tokens)
    n_batch = regime.seq_len if regime.regime == "prefill" else max(regime.context, 32)
    return open_model(path, threads=regime.threads, n_ctx=n_ctx, n_batch=n_batch)


def _measure(regime: Regime):
    return timer(regime.regime, regime.seq_len, regime.context, regime.decode_tokens)


def time_models(
    builder: ModelBuilder,
    specs: Sequence[Sequence[tuple[int, int]]],
    regime: Regime,
    warmup: int,
    repeats: int,
    tick: Any = None,
) -> tuple[list[float], float]:
    """Median ms of each model (per-layer shapes), timed round-robin with the dense model in chunks, each chunk
    rescaled to the median dense time over all chunks; returns (times, dense ms)."""
    L, K, W = builder.geo.num_layers, builder.geo.num_kv_heads, builder.geo.intermediate_size
    dense_path = builder.build([(K, W)] * L)
    measure = _measure(regime)
    results: list[tuple[float, int]] = []
    refs: list[float] = []
    for start in range(0, len(specs), CHUNK - 1):
        chunk = specs[start : start + CHUNK - 1]
        paths = [builder.build(s) for s in chunk]
        models = [_open(p, regime) for p in [dense_path, *paths]]
        try:
            samples = compare(models, measure, warmup=warmup, repeats=repeats)
        finally:
            for em in models:
                em.close()
            for p in paths:
                p.unlink(missing_ok=True)
        refs.append(statistics.median(samples[0]))
        results += [(statistics.median(s), len(refs) - 1) for s in samples[1:]]
        if tick is not None:
            tick(len(chunk))
    dense = statistics.median(refs)
    dense_path.unlink(missing_ok=True)
    return [ms * dense / refs[i] for ms, i in results], dense


def time_layouts(
    lm: Any,
    specs: Sequence[Sequence[tuple[int, int]]],
    regime: Regime,
    warmup: int,
    repeats: int,
    progress: Any = None,
    label: str = "timing in llama.cpp",
) -> tuple[list[float], float]:
    """`time_models` for these layouts, written to a scratch folder that is always removed, with a progress task."""
    task = progress.add_task(label, total=len(specs)) if progress is not None else None

    def tick(n: int) -> None:
        if progress is not None:
            progress.advance(task, n)

    folder = Path(tempfile.mkdtemp(prefix="zipkd-llamacpp-", dir=scratch_dir()))
    try:
        return time_models(ModelBuilder(lm, regime, folder), specs, regime, warmup, repeats, tick)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def profile_llamacpp(
    lm: Any,
    regime: Regime,
    progress: Any = None,
    warmup: int = 1,
    repeats: int = 5,
    widths: Sequence[int] | None = None,
    max_levels: int = 16,
) -> LatencyTable:
    """Measure a latency table in llama.cpp for this (unpruned) model (see the module docstring)."""
    t_start = time.perf_counter()
    check_regime(regime)
    model = lm.model if hasattr(lm, "model") else lm
    geo = base_geometry(model.config)
    if len(layer_shapes(model)) != geo.num_layers or any(
        s.kv_heads != geo.num_kv_heads or s.intermediate != geo.intermediate_size for s in layer_shapes(model)
    ):
        raise ZipkdError(
            "profile the unpruned base model (a pruned model's predictions come from its base's table)"
        )
    K, W, L = geo.num_kv_heads, geo.intermediate_size, geo.num_layers
    if L < 2:
        raise ZipkdError("llama.cpp tables need a model of at least 2 layers")
    grid = sorted(set(widths) | {0, W}) if widths is not None else mlp_grid(W, "cpu", max_levels)
    fp = {**model_fingerprint(model.config), **fingerprint(regime)}
    shapes = [(k, W) for k in range(K)] + [(K, w) for w in grid if w < W]
    H = L // 2
    specs = [[s] * L for s in shapes] + [[(K, W)] * H]  # the last: the half-depth model for `rest`
    times, dense = time_layouts(
        lm, specs, regime, warmup, repeats, progress, f"profiling {regime.regime} in llama.cpp"
    )
    R = times[-1]
    rest = (L * R - H * dense) / (L - H)
    rest_warning = None
    if not rest < dense:
        raise ZipkdError(
            f"inconsistent llama.cpp timings (dense {dense:.3f} ms, {H} layers {R:.3f} ms); profile again on a "
            "quieter machine"
        )
    if rest < 0:  # noise around a small rest (prefill computes the head for the last position only)
        rest_warning = f"rest measured {rest:.3f} ms (noise around 0) set to 0"
        rest = 0.0
    T = {s: (ms - rest) / L for s, ms in zip(shapes, times[:-1], strict=True)}
    T[(K, W)] = (dense - rest) / L
    A, M, c = block_entries(T, K, W, grid, "anchored")
    negative = [f"attention {k}" for k, v in A.items() if v < 0] + [f"mlp {w}" for w, v in M.items() if v < 0]
    A = {k: max(v, 0.0) for k, v in A.items()}
    M = {w: max(v, 0.0) for w, v in M.items()}
    scale = (dense - rest) / (L * (A[K] + M[W]))
    meta: dict[str, Any] = {
        "profiler_version": PROFILER_VERSION,
        "method": "in-model",
        "runtime": "llama.cpp",
        "warmup": warmup,
        "repeats": repeats,
        "additivity_scale": scale,
        "rest_fraction": rest / dense,
        "layer_ms": {f"{k},{w}": v for (k, w), v in sorted(T.items())},
        "half_depth_model_ms": R,
        "layer_overhead_fraction": c / T[(K, W)],
        "build_s": round(time.perf_counter() - t_start, 2),
    }
    warnings = [rest_warning] if rest_warning else []
    if negative:
        warnings.append(f"negative entries clamped to 0 ({', '.join(negative)}): timings were very noisy")
    if not 0.8 < scale < 1.25:
        warnings.append(
            f"the dense model ran {scale:.2f}x its blocks' sum: timings were noisy or blocks overlap"
        )
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        meta["load_average"] = round(load, 2)
        if load > 1.5 * (os.cpu_count() or 1):
            warnings.append(
                f"the CPU was busy while profiling (load average {load:.1f}); re-measure when quiet"
            )
    if warnings:
        meta["warning"] = "; ".join(warnings)
    return LatencyTable(
        regime=regime,
        fingerprint=fp,
        rest_ms=rest,
        attention_ms=A,
        mlp_ms=M,
        num_layers=L,
        measured_dense_ms=dense,
        meta=meta,
        layer_overhead_ms=c,
    )


def validate_llamacpp(
    lm: Any,
    table: LatencyTable,
    n: int = 8,
    speedup_range: tuple[float, float] = (1.2, 3.0),
    seed: int = 0,
    warmup: int = 1,
    repeats: int = 5,
    progress: Any = None,
):
    """Random pruned layouts (as `zipkd.latency.validate.random_shapes` draws them), each written as the GGUF
    zipkd's export makes and timed round-robin with the dense GGUF in llama.cpp: predicted vs measured."""
    regime = table.regime
    check_regime(regime)
    targets = spread_targets(n, speedup_range)
    model = lm.model if hasattr(lm, "model") else lm
    geo = base_geometry(model.config)
    rng = random.Random(seed)
    shapes_list = [random_shapes(table, t, rng, geo.num_kv_heads, geo.intermediate_size) for t in targets]
    times, dense = time_layouts(lm, shapes_list, regime, warmup, repeats, progress, "validating in llama.cpp")
    report = ValidationReport()
    for t, shapes, ms in zip(targets, shapes_list, times, strict=True):
        kept = [{"kv_heads": k, "intermediate": w} for k, w in shapes if k or w]
        report.variants.append(VariantResult.of(table, kept, t, ms, dense))
    return report


def profile(lm: Any, regime: Regime, progress: Any = None, repeats: int = 5, method: str | None = None):
    """The runtime-registry entry point (see `zipkd.latency.runtimes`)."""
    if method not in (None, "in-model"):
        raise ZipkdError("llama.cpp tables are measured in-model only (--method auto or in-model)")
    return profile_llamacpp(lm, regime, progress=progress, repeats=repeats)


def validate(lm: Any, table: LatencyTable, n: int = 8, seed: int = 0, repeats: int = 5, progress: Any = None):
    return validate_llamacpp(lm, table, n=n, seed=seed, repeats=repeats, progress=progress)


def measure_files(
    paths: Sequence[str | os.PathLike], regime: Regime, warmup: int = 1, repeats: int = 5
) -> list[dict[str, Any]]:
    """Time GGUF files round-robin in the regime: median ms and every sample, per file."""
    check_regime(regime)
    models = [_open(Path(p), regime) for p in paths]
    try:
        samples = compare(models, _measure(regime), warmup=warmup, repeats=repeats)
    finally:
        for em in models:
            em.close()
    return [{"median_ms": statistics.median(s), "samples_ms": s, "regime": asdict(regime)} for s in samples]
