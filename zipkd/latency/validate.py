"""Check a latency table against end-to-end measurement: build random pruned variants of the model (random
per-layer widths from the grid, random KV-head counts, removed blocks and dropped layers) spanning a range of
predicted speedups, time each alternately with the dense model, and compare predicted with measured.

The headline error is on speedup (dense / variant, both measured in the same alternating rounds), which is what
pruning targets and is insensitive to slow drifts in machine load between profiling and validation; the error
on absolute latency is reported beside it."""

from __future__ import annotations

import copy
import random
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from zipkd.errors import ZipkdError
from zipkd.latency.measure import _module, compare_ms
from zipkd.latency.profile import _check_model
from zipkd.latency.runtimes import module_quantizer
from zipkd.latency.table import LatencyTable
from zipkd.models.adapters import adapter_for
from zipkd.models.surgery import (
    base_geometry,
    layer_shapes,
    remove_attention,
    remove_mlp,
    slice_attention,
    slice_mlp,
    sync_config,
)


@dataclass
class VariantResult:
    shapes: list[dict[str, int]]  # per kept layer: kv_heads, intermediate
    target_speedup: float
    predicted_ms: float
    measured_ms: float
    dense_measured_ms: float
    predicted_speedup: float
    measured_speedup: float

    @property
    def speedup_error(self) -> float:
        return self.predicted_speedup / self.measured_speedup - 1

    @property
    def latency_error(self) -> float:
        return self.predicted_ms / self.measured_ms - 1

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "speedup_error": self.speedup_error, "latency_error": self.latency_error}

    @classmethod
    def of(
        cls,
        table: LatencyTable,
        shapes: list[dict[str, int]],
        target: float,
        measured_ms: float,
        dense_ms: float,
    ) -> VariantResult:
        """A variant's predicted latency (from the table) beside what was measured with the dense model."""
        pred = table.predict(shapes)
        return cls(
            shapes=shapes,
            target_speedup=target,
            predicted_ms=pred,
            measured_ms=measured_ms,
            dense_measured_ms=dense_ms,
            predicted_speedup=table.dense_ms() / pred,
            measured_speedup=dense_ms / measured_ms,
        )


def spread_targets(n: int, speedup_range: tuple[float, float]) -> list[float]:
    """`n` variant targets spread evenly over `speedup_range`; one clear error for a bad count or range."""
    if n < 1:
        raise ZipkdError("validate needs at least one variant")
    lo, hi = speedup_range
    if not 1.0 <= lo <= hi:
        raise ZipkdError(f"bad speedup range {speedup_range}")
    return [lo + (hi - lo) * i / max(1, n - 1) for i in range(n)]


@dataclass
class ValidationReport:
    variants: list[VariantResult] = field(default_factory=list)

    @property
    def median_abs_speedup_error(self) -> float:
        return statistics.median(abs(v.speedup_error) for v in self.variants)

    @property
    def median_abs_latency_error(self) -> float:
        return statistics.median(abs(v.latency_error) for v in self.variants)

    def to_json(self) -> dict[str, Any]:
        return {
            "variants": [v.to_json() for v in self.variants],
            "median_abs_speedup_error": self.median_abs_speedup_error,
            "median_abs_latency_error": self.median_abs_latency_error,
        }


def random_shapes(
    table: LatencyTable,
    target: float,
    rng: random.Random,
    num_kv_heads: int,
    intermediate: int,
    p_drop: float = 0.08,
    p_attention: float = 0.35,
) -> list[tuple[int, int]]:
    """Random per-layer (kv_heads, width) from the table's levels, cut step by step until the table predicts at
    least `target` speedup. Each step picks a random layer and either drops it, or lowers its attention or MLP
    to a random lower level (possibly 0 = removed). Pure: depends on the table and the generator only."""
    L = table.num_layers
    a_levels, m_levels = table.attention_levels, table.mlp_levels
    if num_kv_heads not in a_levels or intermediate not in m_levels:
        raise ZipkdError("the table has no entry for the dense layer shape")
    shapes = [[num_kv_heads, intermediate] for _ in range(L)]
    dense = table.dense_ms()

    def speedup() -> float:
        return dense / table.predict([{"kv_heads": k, "intermediate": w} for k, w in shapes])

    for _ in range(100 * L * (len(m_levels) + len(a_levels))):
        if speedup() >= target:
            break
        i = rng.randrange(L)
        k, w = shapes[i]
        if k == 0 and w == 0:
            continue
        before = list(shapes[i])
        u = rng.random()
        if u < p_drop:
            shapes[i] = [0, 0]
        elif u < p_drop + p_attention and k > 0:
            lower = [x for x in a_levels if x < k]
            shapes[i][0] = rng.choice(lower)
        elif w > 0:
            lower = [x for x in m_levels if x < w]
            # Favour moderate cuts so widths spread over the grid instead of collapsing to 0.
            span = max(1, len(lower) // 3)
            shapes[i][1] = rng.choice(lower[-span:] if rng.random() < 0.7 else lower)
        if all(s == [0, 0] for s in shapes):  # keep at least one block: a model needs a layer
            shapes[i] = before
    return [(k, w) for k, w in shapes]


def build_variant(
    model: torch.nn.Module, shapes: Sequence[tuple[int, int]], rng: random.Random
) -> torch.nn.Module:
    """A pruned copy of `model` with these per-layer shapes (random KV groups/channels kept; empty layers
    dropped), made with zipkd's surgery so it is what the pruner would produce."""
    new = copy.deepcopy(model)
    ad = adapter_for(new.config)
    geo = base_geometry(new.config)
    layers = ad.layers(new)
    if len(shapes) != len(layers):
        raise ZipkdError(f"{len(shapes)} shapes for {len(layers)} layers")
    for layer, (k, w) in zip(layers, shapes, strict=True):
        if k == 0:
            remove_attention(layer, ad)
        elif k < geo.num_kv_heads:
            slice_attention(
                layer, ad, geo.head_dim, geo.group_size, sorted(rng.sample(range(geo.num_kv_heads), k))
            )
        if w == 0:
            remove_mlp(layer, ad)
        elif w < geo.intermediate_size:
            slice_mlp(layer, ad, sorted(rng.sample(range(geo.intermediate_size), w)))
    sync_config(new)
    return new.eval()


def validate_table(
    lm: Any,
    table: LatencyTable,
    n: int = 8,
    speedup_range: tuple[float, float] = (1.2, 3.0),
    seed: int = 0,
    warmup: int = 2,
    repeats: int = 7,
    group: int = 4,
    progress: Any = None,
) -> ValidationReport:
    """Measure `n` random pruned variants (targets spread evenly over `speedup_range`) against the dense model,
    `group` variants at a time, each group timed alternately with the dense model."""
    targets = spread_targets(n, speedup_range)
    model = _module(lm).eval()
    regime = table.regime
    device = _check_model(model, regime)
    geo = base_geometry(model.config)
    if len(layer_shapes(model)) != geo.num_layers:
        raise ZipkdError("validate the table with the unpruned base model")
    rng = random.Random(seed)
    quantize = module_quantizer(regime.quantization)
    dense = quantize(copy.deepcopy(model), regime.quantization, str(device)) if quantize else model
    task = progress.add_task("validating", total=n) if progress is not None else None
    report = ValidationReport()
    for start in range(0, n, group):
        chunk = targets[start : start + group]
        shapes_list = [random_shapes(table, t, rng, geo.num_kv_heads, geo.intermediate_size) for t in chunk]
        variants = [build_variant(model, s, rng) for s in shapes_list]
        if quantize:
            variants = [quantize(v, regime.quantization, str(device)) for v in variants]
        stats = compare_ms([dense, *variants], regime, warmup=warmup, repeats=repeats)
        d = stats[0]["median_ms"]
        for t, v, st in zip(chunk, variants, stats[1:], strict=True):
            kept = [asdict(s) for s in layer_shapes(v)]
            report.variants.append(VariantResult.of(table, kept, t, st["median_ms"], d))
            if progress is not None:
                progress.advance(task)
        del variants
    return report
