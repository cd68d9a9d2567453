"""DP search: the knapsack against brute force, latency constraint and messages on synthetic tables (no timing)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from zipkd.errors import ZipkdError
from zipkd.latency.table import LatencyTable, Regime
from zipkd.models.surgery import LayerShape
from zipkd.prune.database import BlockDatabase, LayerDatabase, ModelDatabase
from zipkd.prune.obs import Level
from zipkd.prune.search import (
    check_reachable,
    knapsack,
    max_speedup,
    max_uniform_speedup,
    select,
    select_layout_uniform,
    select_uniform,
    shrink_errors,
)


def _brute(costs, errors, budget):
    best = None
    for picks in itertools.product(*[range(len(c)) for c in costs]):
        c = sum(costs[g][o] for g, o in enumerate(picks))
        e = sum(errors[g][o] for g, o in enumerate(picks))
        if c <= budget and (best is None or e < best[0] - 1e-12):
            best = (e, picks)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_knapsack_matches_brute_force(seed):
    rng = random.Random(seed)
    groups = rng.randint(1, 4)
    costs = [[rng.randint(0, 9) for _ in range(rng.randint(1, 4))] for _ in range(groups)]
    errors = [[rng.random() for _ in c] for c in costs]
    budget = rng.randint(0, 25)
    got = knapsack(costs, errors, budget)
    ref = _brute(costs, errors, budget)
    if ref is None:
        assert got is None
        return
    assert sum(costs[g][o] for g, o in enumerate(got)) <= budget
    assert sum(errors[g][o] for g, o in enumerate(got)) == pytest.approx(ref[0])


def _table(layers=4, rest=3.0, kv=3, width=64, step=16):
    att = {k: 0.0 if k == 0 else 0.5 + 0.4 * k for k in range(kv + 1)}
    mlp = {w: 0.0 if w == 0 else 0.2 + w / 16 for w in range(0, width + 1, step)}
    return LatencyTable(Regime(), {}, rest, att, mlp, layers)


def _db(layers=4, kv=3, width=64, step=16, seed=0):
    """Errors grow as structures go (convex-ish), with layer-dependent sensitivity."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(layers):
        s = float(torch.rand(1, generator=g)) + 0.1 * i
        att = {k: Level(k, torch.arange(k), s * (kv - k) ** 2) for k in range(kv + 1)}
        mlp = {
            w: Level(w, torch.arange(w), s * ((width - w) / step) ** 1.5) for w in range(0, width + 1, step)
        }
        out.append(LayerDatabase(BlockDatabase("attention", kv, att), BlockDatabase("mlp", width, mlp)))
    return ModelDatabase("zipkd", out)


def _all_choices(db, table):
    for picks in itertools.product(*[layer.options() for layer in db.layers]):
        yield picks, sum(e for _, _, e in picks)


@pytest.mark.parametrize("target", [1.2, 1.5, 2.0, 3.0])
def test_select_is_optimal_and_meets_target(target):
    db, tab = _db(layers=3), _table(layers=3)
    ch = select(db, tab, target, resolution=4000)
    assert tab.predict(ch.shapes) == pytest.approx(ch.predicted_ms)
    assert ch.predicted_ms <= tab.dense_ms() / target * (1 + 1e-9)
    limit = tab.dense_ms() / target
    from zipkd.models.surgery import LayerShape

    best = min(
        e
        for picks, e in _all_choices(db, tab)
        if tab.predict([LayerShape(k, w) for k, w, _ in picks]) <= limit
        and not all(k == 0 and w == 0 for k, w, _ in picks)
    )
    # Discretisation at 1/4000 of dense may cost a little optimality, never feasibility.
    assert ch.error <= best * 1.02 + 1e-9


def test_one_x_keeps_everything():
    db, tab = _db(), _table()
    ch = select(db, tab, 1.0)
    assert all(s.kv_heads == 3 and s.intermediate == 64 for s in ch.shapes)
    assert ch.error == 0.0 and ch.predicted_speedup == pytest.approx(1.0)


def test_family_errors_grow_with_target():
    db, tab = _db(layers=6), _table(layers=6)
    errs = [select(db, tab, t).error for t in (1.25, 1.5, 2.0, 2.5)]
    assert errs == sorted(errs) and errs[0] > 0


def test_unreachable_target_names_the_largest_reachable():
    db, tab = _db(), _table()
    top = max_speedup(db, tab)
    with pytest.raises(ZipkdError, match=rf"largest reachable speedup is {top:.2f}x"):
        select(db, tab, top * 1.05)
    ch = select(db, tab, top * 0.999)  # just below it is reachable
    assert sum(not s.empty for s in ch.shapes) >= 1
    with pytest.raises(ZipkdError, match="at least 1x"):
        select(db, tab, 0.5)


def test_layer_drop_database_drops_whole_layers():
    db, tab = _db(), _table()
    for i, layer in enumerate(db.layers):
        layer.joint = True
        layer.attention.levels[0].error = float(i + 1)  # later layers matter more
        layer.mlp.levels[0].error = 0.0
    ch = select(db, tab, 1.3)
    dropped = [i for i, s in enumerate(ch.shapes) if s.empty]
    assert dropped and dropped == list(range(len(dropped)))  # the least influential first
    assert all(s.empty or (s.kv_heads == 3 and s.intermediate == 64) for s in ch.shapes)


def test_uniform_takes_the_largest_fitting_shape():
    db, tab = _db(), _table()
    ch = select_uniform(db, tab, 1.5)
    assert len({(s.kv_heads, s.intermediate) for s in ch.shapes}) == 1
    assert ch.predicted_ms <= tab.dense_ms() / 1.5
    bigger = [
        (k, w)
        for k in range(1, 4)
        for w in range(16, 65, 16)
        if tab.predict([type(ch.shapes[0])(k, w)] * 4) > ch.predicted_ms
    ]
    assert all(tab.predict([type(ch.shapes[0])(k, w)] * 4) > tab.dense_ms() / 1.5 for k, w in bigger)
    with pytest.raises(ZipkdError, match="uniform width pruning; the largest reachable"):
        select_uniform(db, tab, 50)


def test_rounding_never_breaks_the_constraint():
    rng = random.Random(3)
    for _ in range(10):
        tab = _table(layers=5)
        tab.attention_ms = {k: v * (1 + 0.3 * rng.random()) for k, v in tab.attention_ms.items()}
        tab.mlp_ms = {k: v * (1 + 0.3 * rng.random()) for k, v in tab.mlp_ms.items()}
        t = 1 + 2 * rng.random()
        ch = select(_db(layers=5), tab, t, resolution=50)  # coarse grid: rounding drift is large
        assert tab.predict(ch.shapes) <= tab.dense_ms() / t * (1 + 1e-9)


def _brute_uniform(db, tab, target):
    """Naive reference for `--layout uniform`: every (kv, width) and every subset of dropped layers."""
    n = len(db.layers)
    best = None
    for kv in tab.attention_levels[1:]:
        for w in tab.mlp_levels[1:]:
            for mask in itertools.product((False, True), repeat=n):
                if all(mask):
                    continue
                shapes = [LayerShape(0, 0) if m else LayerShape(kv, w) for m in mask]
                if tab.predict(shapes) > tab.dense_ms() / target + 1e-9:
                    continue
                err = sum(
                    (lay.attention.error(0) + lay.mlp.error(0))
                    if m
                    else (lay.attention.error(kv) + lay.mlp.error(w))
                    for lay, m in zip(db.layers, mask, strict=True)
                )
                if best is None or err < best - 1e-12:
                    best = err
    return best


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("target", [1.2, 1.5, 2.0, 3.0])
def test_uniform_layout_matches_brute_force(seed, target):
    db, tab = _db(layers=5, seed=seed), _table(layers=5)
    ref = _brute_uniform(db, tab, target)
    if ref is None:
        with pytest.raises(ZipkdError, match="largest reachable uniform speedup"):
            select_layout_uniform(db, tab, target)
        return
    ch = select_layout_uniform(db, tab, target)
    kept = {(s.kv_heads, s.intermediate) for s in ch.shapes if not s.empty}
    assert len(kept) == 1 and min(next(iter(kept))) >= 1  # one shape, both blocks kept: standard fields
    assert ch.predicted_ms <= tab.dense_ms() / target + 1e-9
    assert ch.error == pytest.approx(ref)


def test_uniform_layout_costs_at_least_the_heterogeneous_error():
    db, tab = _db(layers=5, seed=2), _table(layers=5)
    for t in (1.3, 1.6, 2.0):
        assert select_layout_uniform(db, tab, t).error >= select(db, tab, t).error - 1e-9


def test_uniform_layout_unreachable_names_the_largest_uniform_speedup():
    tab = _table(layers=4)
    top = max_uniform_speedup(tab)
    # the fastest uniform model: one layer kept at the smallest nonzero shape
    fastest = tab.predict([LayerShape(1, 16)] + [LayerShape(0, 0)] * 3)
    assert top == pytest.approx(tab.dense_ms() / fastest)
    check_reachable(tab, [top * 0.99], layout="uniform")
    with pytest.raises(ZipkdError, match=f"largest reachable uniform speedup is {top:.2f}x"):
        check_reachable(tab, [1.5, top * 1.01], layout="uniform")
    # a table without an entry for a dropped layer: widths only
    tab.attention_ms.pop(0)
    assert max_uniform_speedup(tab) == pytest.approx(tab.dense_ms() / (tab.rest_ms + 4 * tab.layer_ms(1, 16)))


# ------------------------------------------------------------------------------------------- error shrinkage
def test_shrink_zero_is_the_database_and_one_is_the_layer_mean():
    db = _db(seed=3)
    assert shrink_errors(db, 0.0) is db
    full = shrink_errors(db, 1.0)
    for kind in ("attention", "mlp"):
        for size in getattr(db.layers[0], kind).sizes:
            errs = [getattr(layer, kind).error(size) for layer in db.layers]
            got = [getattr(layer, kind).error(size) for layer in full.layers]
            if all(e == 0 for e in errs):
                assert got == errs
                continue
            geo = math.exp(sum(math.log(e) for e in errs) / len(errs))  # naive geometric mean
            assert got == pytest.approx([geo] * len(errs), rel=1e-12)
    # the input database is not modified, and the kept structures are shared unchanged
    assert db.layers[1].mlp.error(16) != full.layers[1].mlp.error(16)
    assert torch.equal(db.layers[1].mlp.keep(16), full.layers[1].mlp.keep(16))


@pytest.mark.parametrize("s", [0.25, 0.5, 0.75])
def test_shrink_interpolates_log_errors(s):
    db = _db(seed=5)
    out = shrink_errors(db, s)
    logs = [math.log(layer.attention.error(1)) for layer in db.layers]
    mean = sum(logs) / len(logs)
    for layer, lg in zip(out.layers, logs, strict=True):
        assert math.log(layer.attention.error(1)) == pytest.approx((1 - s) * lg + s * mean, abs=1e-12)


def test_full_shrink_spreads_cuts_evenly_on_identical_layers():
    """With every layer's curve the same and identical latencies, the shrunk search cuts every layer alike
    (up to the knapsack's discreteness: kept sizes differ by at most one grid step)."""
    db, tab = _db(seed=1), _table()
    shapes = select(shrink_errors(db, 1.0), tab, 1.5).shapes
    assert max(s.intermediate for s in shapes) - min(s.intermediate for s in shapes) <= 16
    assert select(db, tab, 1.5).shapes != shapes  # the unshrunk errors do spread them differently


def test_shrink_leaves_whole_layer_databases_and_rejects_bad_strength():
    db = _db()
    joint = ModelDatabase(db.method, [LayerDatabase(x.attention, x.mlp, joint=True) for x in db.layers])
    assert shrink_errors(joint, 0.5) is joint
    with pytest.raises(ZipkdError, match="shrinkage"):
        shrink_errors(db, 1.5)


def test_prune_config_shrinkage_reaches_the_search_and_reports_the_real_error():
    from zipkd.prune.api import PruneConfig, select_structure
    from zipkd.prune.search import summed_error

    db, tab = _db(seed=1), _table()
    choice = select_structure(db, tab, 1.5, PruneConfig(target_speedup=1.5, error_shrink=1.0))
    assert choice.shapes == select(shrink_errors(db, 1.0), tab, 1.5).shapes
    assert choice.shapes != select(db, tab, 1.5).shapes
    assert choice.error == pytest.approx(summed_error(db, choice.shapes))
    with pytest.raises(ZipkdError, match="shrinkage"):
        PruneConfig(error_shrink=-0.1)
