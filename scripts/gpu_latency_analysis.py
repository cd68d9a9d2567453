"""Offline look at a recorded `scripts/gpu_latency.py` run: what do the measured variant latencies depend on?

For each regime in the JSON it fits two small linear models to the *measured* latencies of the random pruned
variants (plus the dense model), leave-one-out, and reports the median |predicted/measured speedup − 1| of each
held-out variant:

- "counts": rest + a·(attention blocks kept) + m·(MLP blocks kept) — a launch-bound GPU, where a block costs
  its kernel launches whatever its width;
- "counts+widths": the same plus a term in the total kept KV heads and one in the total kept MLP width — a
  compute- or memory-bound GPU, where narrower blocks are cheaper.

If "counts" alone explains a regime, a table that prices blocks by their width measured alone (the "anchored"
method) cannot predict it, while one measured inside whole models (the "in-model" method) can. This reads
numbers only; it measures nothing and needs no GPU.

    python scripts/gpu_latency_analysis.py [docs/gpu-runs/rerun/gpu_latency.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

DEFAULT = Path(__file__).resolve().parent.parent / "docs" / "gpu-runs" / "rerun" / "gpu_latency.json"


def features(shapes: list[dict], full_kv: int, full_width: int, widths: bool) -> list[float]:
    attn = sum(1 for s in shapes if s["kv_heads"] > 0)
    mlp = sum(1 for s in shapes if s["intermediate"] > 0)
    row = [1.0, attn, mlp]
    if widths:
        row += [
            sum(s["kv_heads"] for s in shapes) / full_kv,
            sum(s["intermediate"] for s in shapes) / full_width,
        ]
    return row


def loo_speedup_errors(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Leave-one-out over the variants (every row but the last, which is the dense model and is always kept)."""
    errors = []
    for i in range(len(y) - 1):
        keep = np.ones(len(y), dtype=bool)
        keep[i] = False
        coef, *_ = np.linalg.lstsq(x[keep], y[keep], rcond=None)
        predicted = y[-1] / float(x[i] @ coef)
        measured = y[-1] / y[i]
        errors.append(predicted / measured - 1)
    return np.array(errors)


def main(path: Path) -> None:
    run = json.loads(path.read_text())
    model = run["model"]
    full_kv, full_width, layers = model["num_key_value_heads"], model["intermediate_size"], run["layers"]
    print(f"{path} — {run['device']}, {layers} layers, torch {run['torch']}")
    print(f"{'regime':34} {'table':>7} {'counts':>7} {'counts+widths':>14}")
    for name, regime in run["regimes"].items():
        variants = regime["validation"]["variants"]
        dense_ms = float(np.mean([v["dense_measured_ms"] for v in variants]))
        dense_shapes = [{"kv_heads": full_kv, "intermediate": full_width}] * layers
        y = np.array([v["measured_ms"] for v in variants] + [dense_ms])
        cells = []
        for widths in (False, True):
            x = np.array(
                [features(v["shapes"], full_kv, full_width, widths) for v in variants]
                + [features(dense_shapes, full_kv, full_width, widths)]
            )
            cells.append(np.median(np.abs(loo_speedup_errors(x, y))))
        table = regime["validation"]["median_abs_speedup_error"]
        print(f"{name:34} {table:7.1%} {cells[0]:7.1%} {cells[1]:14.1%}")
    print(
        "(median |predicted/measured speedup - 1|: the table's own prediction, then each fitted model, leave-one-out)"
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT)
