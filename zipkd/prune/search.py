"""Search over a database: a multiple-choice knapsack solved by dynamic programming over layers.

Pick one (attention level, MLP level) per layer to minimise the summed error subject to the latency table's
prediction ≤ dense / target. Latencies are discretised in units of dense/`resolution` (rounded down, so the DP is a
relaxation); the chosen solution is re-checked with the exact table and the budget tightened until it holds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from zipkd.errors import ZipkdError
from zipkd.latency.table import LatencyTable
from zipkd.models.surgery import LayerShape
from zipkd.prune.database import BlockDatabase, LayerDatabase, ModelDatabase
from zipkd.prune.obs import Level

_TOL = 1e-9


@dataclass
class Choice:
    """The structure picked for one target: per original layer (kv_heads, width), 0 = block removed."""

    target: float
    shapes: list[LayerShape]
    predicted_ms: float
    dense_ms: float
    error: float

    @property
    def predicted_speedup(self) -> float:
        return self.dense_ms / self.predicted_ms


def knapsack(
    costs: Sequence[Sequence[int]], errors: Sequence[Sequence[float]], budget: int
) -> list[int] | None:
    """Multiple-choice knapsack: one option per group, Σ cost ≤ budget (integers ≥ 0), minimum Σ error.
    Returns the chosen option index per group, or None when nothing fits. Ties go to the lower index."""
    if budget < 0:
        return None
    inf = np.inf
    dp = np.zeros(budget + 1)  # dp[b]: least error of the groups so far with total cost ≤ b
    back = []
    for c_g, e_g in zip(costs, errors, strict=False):
        new = np.full(budget + 1, inf)
        arg = np.zeros(budget + 1, dtype=np.int32)
        for o, (c, e) in enumerate(zip(c_g, e_g, strict=False)):
            if c > budget:
                continue
            cand = np.full(budget + 1, inf)
            cand[c:] = dp[: budget + 1 - c] + e
            better = cand < new
            new[better] = cand[better]
            arg[better] = o
        dp = new
        back.append(arg)
    if not np.isfinite(dp[budget]):
        return None
    picks = []
    b = budget
    for g in range(len(costs) - 1, -1, -1):
        o = int(back[g][b])
        picks.append(o)
        b -= costs[g][o]
    return picks[::-1]


def check_table(db: ModelDatabase, table: LatencyTable) -> None:
    """The database was built on this table's grid and the table describes this many layers."""
    if table.num_layers != len(db.layers):
        raise ZipkdError(f"latency table is for {table.num_layers} layers, the model has {len(db.layers)}")
    for layer in db.layers:
        for kv in layer.attention.sizes:
            if kv not in table.attention_ms:
                raise ZipkdError(
                    f"latency table has no entry for {kv} KV heads (levels {table.attention_levels})"
                )
        for w in layer.mlp.sizes:
            if w not in table.mlp_ms:
                raise ZipkdError(f"latency table has no entry for MLP width {w} (levels {table.mlp_levels})")


def max_speedup(db: ModelDatabase, table: LatencyTable) -> float:
    """Largest speedup the table allows for this database while keeping at least one block."""
    mins, gaps = [], []
    for layer in db.layers:
        costs = [table.layer_ms(kv, w) for kv, w, _ in layer.options()]
        nonempty = [table.layer_ms(kv, w) for kv, w, _ in layer.options() if kv or w]
        mins.append(min(costs))
        gaps.append(min(nonempty) - min(costs) if nonempty else math.inf)
    fastest = table.rest_ms + sum(mins) + max(0.0, min(gaps))
    return table.dense_ms() / fastest if fastest > 0 else math.inf


LAYOUTS = ("heterogeneous", "uniform")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ZipkdError(f"unknown layout {layout!r}; choose {' or '.join(LAYOUTS)}")
    return layout


def uniform_layouts(table: LatencyTable) -> list[tuple[int, int, int, float]]:
    """Every portable layout on the table's grid: (kv_heads, width, dropped layers, predicted ms). Kept layers
    all have the same KV groups (≥ 1) and MLP width (≥ 1), so the standard config fields describe the model;
    at least one layer is kept, and layers can be dropped only if the table has an entry for a dropped layer."""
    n = table.num_layers
    can_drop = 0 in table.attention_ms and 0 in table.mlp_ms
    drop_ms = table.layer_ms(0, 0) if can_drop else 0.0
    out = []
    for kv in table.attention_levels:
        for w in table.mlp_levels:
            if kv < 1 or w < 1:
                continue
            per = table.layer_ms(kv, w)
            for d in range(n if can_drop else 1):
                out.append((kv, w, d, table.rest_ms + (n - d) * per + d * drop_ms))
    return out


def max_uniform_speedup(table: LatencyTable) -> float:
    fastest = min(ms for *_, ms in uniform_layouts(table))
    return table.dense_ms() / fastest if fastest > 0 else math.inf


def select_layout_uniform(db: ModelDatabase, table: LatencyTable, target: float) -> Choice:
    """Least-error *portable* structure (`--layout uniform`): one (KV groups, MLP width) in every kept layer
    plus a set of dropped layers, predicted latency ≤ dense/target. For each (kv, width, d) the d layers to
    drop are those whose drop costs the least extra error over keeping them at (kv, width); the search is
    exhaustive over the grid (levels² × layers candidates), so it is exact for the summed-error objective."""
    if not target >= 1.0:
        raise ZipkdError(f"target speedup must be at least 1x (got {target})")
    check_table(db, table)
    opts = [layer.options() for layer in db.layers]
    if any(math.isnan(e) for o in opts for _, _, e in o):
        raise ValueError(f"the {db.method} database has no errors to search over; use select_uniform")
    dense = table.dense_ms()
    limit = dense / target
    best: tuple[float, float, list[LayerShape]] | None = None
    for kv, w, d, ms in uniform_layouts(table):
        if ms > limit * (1 + _TOL) + _TOL:
            continue
        if any(kv not in lay.attention.levels or w not in lay.mlp.levels for lay in db.layers):
            continue
        keep_err = [lay.attention.error(kv) + lay.mlp.error(w) for lay in db.layers]
        drop_err = [lay.attention.error(0) + lay.mlp.error(0) for lay in db.layers] if d else keep_err
        # Ties in the extra error go to the later layer (kept layers are mostly the early ones).
        order = sorted(range(len(db.layers)), key=lambda i: (drop_err[i] - keep_err[i], -i))
        dropped = set(order[:d])
        err = sum(drop_err[i] if i in dropped else keep_err[i] for i in range(len(db.layers)))
        shapes = [LayerShape(0, 0) if i in dropped else LayerShape(kv, w) for i in range(len(db.layers))]
        if best is None or (err, -ms) < (best[0], -best[1]):
            best = (err, ms, shapes)
    if best is None:
        raise _unreachable_uniform(target, table)
    err, ms, shapes = best
    return Choice(target, shapes, table.predict(shapes), dense, float(err))


def _unreachable_uniform(target: float, table: LatencyTable) -> ZipkdError:
    return ZipkdError(
        f"target speedup {target:g}x is unreachable with a uniform layout on this latency table; the largest "
        f"reachable uniform speedup is {max_uniform_speedup(table):.2f}x (the heterogeneous layout reaches "
        "further)"
    )


def check_reachable(
    table: LatencyTable,
    targets: Sequence[float],
    uniform: bool = False,
    whole_layers: bool = False,
    layout: str = "heterogeneous",
) -> None:
    """Refuse, from the latency table alone (before any calibration), a target that no structure on the
    table's grid reaches; the error names the largest reachable speedup. `uniform`: the method's own uniform
    width search; `layout="uniform"`: portable layouts (uniform widths plus dropped layers)."""
    if layout == "uniform" and not (uniform or whole_layers):
        for target in targets:
            if target > max_uniform_speedup(table) * (1 + 1e-9):
                raise _unreachable_uniform(target, table)
        return
    full_kv, full_w = max(table.attention_ms), max(table.mlp_ms)

    def block(kind: str, full: int, sizes: Sequence[int]) -> BlockDatabase:
        return BlockDatabase(kind, full, {s: Level(s, torch.arange(s), 0.0) for s in sizes})

    if whole_layers:
        sizes_a, sizes_m = [0], [0]
    else:
        sizes_a, sizes_m = list(table.attention_ms), list(table.mlp_ms)
    skeleton = ModelDatabase(
        "reachability",
        [
            LayerDatabase(block("attention", full_kv, sizes_a), block("mlp", full_w, sizes_m), whole_layers)
            for _ in range(table.num_layers)
        ],
    )
    for target in targets:
        if uniform:
            select_uniform(skeleton, table, target)
        elif target > max_speedup(skeleton, table) * (1 + 1e-9):
            raise _unreachable(target, skeleton, table)


def _unreachable(target: float, db: ModelDatabase, table: LatencyTable) -> ZipkdError:
    return ZipkdError(
        f"target speedup {target:g}x is unreachable with this latency table; the largest reachable "
        f"speedup is {max_speedup(db, table):.2f}x"
    )


def shrink_errors(db: ModelDatabase, strength: float) -> ModelDatabase:
    """The database with each layer's error curves pulled toward the layers' common curve: for every block kind
    and kept size, log eₗ → (1−s)·log eₗ + s·mean over layers of log e (a geometric, James–Stein-like
    shrinkage; zero errors stay zero). s = 0 is the database itself; s = 1 gives every layer the same curve, so
    the search spreads the cuts by latency alone. The errors are estimates from the calibration text; shrinking
    them hedges against text the calibration never saw (the strength is chosen by leaving one calibration domain
    out, BENCHMARKS.md). Whole-layer (joint) databases are returned unchanged."""
    if not 0.0 <= strength <= 1.0:
        raise ZipkdError(f"error shrinkage must lie in [0, 1] (got {strength})")
    if strength == 0.0 or any(layer.joint for layer in db.layers):
        return db

    def shrunk(kind: str) -> list[BlockDatabase]:
        blocks = [getattr(layer, kind) for layer in db.layers]
        logs: dict[int, list[float]] = {}
        for b in blocks:
            for size, lvl in b.levels.items():
                if lvl.error > 0 and math.isfinite(lvl.error):
                    logs.setdefault(size, []).append(math.log(lvl.error))
        mean = {size: sum(v) / len(v) for size, v in logs.items()}
        out = []
        for b in blocks:
            levels = {}
            for size, lvl in b.levels.items():
                e = lvl.error
                if e > 0 and math.isfinite(e):
                    e = math.exp((1.0 - strength) * math.log(e) + strength * mean[size])
                levels[size] = replace(lvl, error=e)
            out.append(BlockDatabase(b.kind, b.full, levels))
        return out

    layers = [
        replace(layer, attention=a, mlp=m)
        for layer, a, m in zip(db.layers, shrunk("attention"), shrunk("mlp"), strict=True)
    ]
    return replace(db, layers=layers)


def summed_error(db: ModelDatabase, shapes: Sequence[LayerShape]) -> float:
    """The database's error of a structure (the search objective)."""
    return float(
        sum(
            layer.attention.error(s.kv_heads) + layer.mlp.error(s.intermediate)
            for layer, s in zip(db.layers, shapes, strict=True)
        )
    )


def select(db: ModelDatabase, table: LatencyTable, target: float, resolution: int = 2000) -> Choice:
    """Least-error structure whose predicted latency is at most dense/target."""
    if not target >= 1.0:
        raise ZipkdError(f"target speedup must be at least 1x (got {target})")
    check_table(db, table)
    dense = table.dense_ms()
    limit = dense / target
    if target > max_speedup(db, table) * (1 + 1e-9):
        raise _unreachable(target, db, table)
    opts = [layer.options() for layer in db.layers]
    if any(math.isnan(e) for o in opts for _, _, e in o):
        raise ValueError(f"the {db.method} database has no errors to search over; use select_uniform")
    unit = dense / resolution
    # Costs rounded down: every truly feasible structure stays feasible in the DP (Σ⌊c⌋ ≤ ⌊Σc⌋); an infeasible
    # DP answer is caught by the exact check below and the budget tightened.
    costs = [[max(0, int(math.floor(table.layer_ms(kv, w) / unit + 1e-9))) for kv, w, _ in o] for o in opts]
    errors = [[e for _, _, e in o] for o in opts]
    budget = int(math.floor((limit - table.rest_ms) / unit + 1e-9))
    for _ in range(64):
        picks = knapsack(costs, errors, budget)
        if picks is None:
            break
        shapes = [LayerShape(opts[i][p][0], opts[i][p][1]) for i, p in enumerate(picks)]
        ms = table.predict(shapes)
        if ms <= limit * (1 + _TOL) + _TOL:
            if all(s.empty for s in shapes):
                break
            err = float(sum(errors[i][p] for i, p in enumerate(picks)))
            return Choice(target, shapes, ms, dense, err)
        budget -= max(1, int(math.ceil((ms - limit) / unit)))  # rounding drift: tighten and retry
    raise _unreachable(target, db, table)


def select_uniform(
    db: ModelDatabase, table: LatencyTable, target: float, min_kv: int = 1, min_width: int = 1
) -> Choice:
    """Uniform width pruning: the same (kv_heads, width) in every layer, the largest that fits the target."""
    if not target >= 1.0:
        raise ZipkdError(f"target speedup must be at least 1x (got {target})")
    check_table(db, table)
    dense = table.dense_ms()
    limit = dense / target
    L = len(db.layers)
    att, mlp = db.layers[0].attention.sizes, db.layers[0].mlp.sizes
    best = None
    for kv in att:
        for w in mlp:
            if kv < min_kv or w < min_width:
                continue
            ms = table.predict([LayerShape(kv, w)] * L)
            if ms <= limit * (1 + _TOL) + _TOL and (best is None or (ms, kv) > (best[0], best[1])):
                best = (ms, kv, w)
    if best is None:
        fastest = min(
            table.predict([LayerShape(kv, w)] * L)
            for kv in att
            for w in mlp
            if kv >= min_kv and w >= min_width
        )
        raise ZipkdError(
            f"target speedup {target:g}x is unreachable by uniform width pruning; the largest "
            f"reachable speedup is {dense / fastest:.2f}x"
        )
    ms, kv, w = best
    return Choice(target, [LayerShape(kv, w)] * L, ms, dense, float("nan"))
