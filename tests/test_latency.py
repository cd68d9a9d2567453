"""Latency tables: timing mechanics, table maths, fingerprints and caching, random variants, `zipkd profile`.

Timings on a shared 2-core CPU are noisy, so fast tests check mechanics and exact maths (synthetic times), not
speed; the one real-model test checks gross facts that survive heavy load (a full-width MLP is slower than a
64-wide one). Accuracy is the bench's job (scripts/bench_latency_prediction.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from zipkd.errors import ZipkdError
from zipkd.latency.measure import compare_ms, measure_ms, model_step
from zipkd.latency.profile import (
    block_entries,
    capture_layer_inputs,
    device_fingerprint,
    layer_step,
    layer_variant,
    load_or_profile,
    mlp_grid,
    model_fingerprint,
    parse_device,
    profile_model,
    table_cache_path,
    uniform_model,
    without_layers,
)
from zipkd.latency.runtimes import module_quantizer
from zipkd.latency.table import LatencyTable, Regime
from zipkd.latency.validate import build_variant, random_shapes, validate_table
from zipkd.models.surgery import layer_shapes

PREFILL = Regime(seq_len=16)
DECODE = Regime(regime="decode", batch=2, context=8)
FAST = dict(warmup=0, repeats=1)


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ZIPKD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ---------------------------------------------------------------- measuring


@pytest.mark.parametrize("regime", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_measure_and_compare(tiny_llama, regime):
    r = measure_ms(tiny_llama, regime, warmup=1, repeats=3)
    assert r["repeats"] == 3 and len(r["samples_ms"]) == 3
    assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"]
    both = compare_ms([tiny_llama, tiny_llama], regime, warmup=0, repeats=2)
    assert [b["repeats"] for b in both] == [2, 2]


def test_decode_step_restores_cache(tiny_llama):
    """Every timed decode step must see a cache of exactly `context` tokens."""
    step = model_step(tiny_llama, DECODE)
    cache = step._keep[0]
    with torch.inference_mode():
        for _ in range(3):
            step.run()
            assert cache.get_seq_length() == DECODE.context + 1
            step.reset()
            assert cache.get_seq_length() == DECODE.context


def test_prefill_inputs_are_used(tiny_llama):
    ids = torch.randint(0, 128, (3, 5))
    seen = []
    h = tiny_llama.model.embed_tokens.register_forward_hook(lambda m, a, o: seen.append(tuple(a[0].shape)))
    try:
        measure_ms(tiny_llama, PREFILL, inputs=ids, warmup=0, repeats=1)
    finally:
        h.remove()
    assert seen == [(3, 5)]


# ---------------------------------------------------------------- layer timing


@pytest.mark.parametrize("regime", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_captured_layer_inputs_reproduce_the_layer(regime):
    """The arguments captured for single-layer timing are the model's own: a copy of layer 0 run on them gives
    the model's layer-0 output (so the timed work is the real work)."""
    model = tiny_model()
    layer = model.model.layers[0]
    outs = []
    h = layer.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
    try:
        hidden, kwargs = capture_layer_inputs(model, layer, regime)
    finally:
        h.remove()
    K, W = 2, 96
    step = layer_step(layer_variant(layer, model.config, K, W), hidden, kwargs, regime, model.config, K)
    with torch.inference_mode():
        got = step.run()
    got = got[0] if isinstance(got, tuple) else got
    assert got.shape == outs[-1].shape
    if regime.regime == "prefill":  # decode uses a random cache, so only the shape can match
        torch.testing.assert_close(got, outs[-1], rtol=1e-5, atol=1e-5)


def test_layer_variant_shapes():
    model = tiny_model()
    layer = model.model.layers[1]
    v = layer_variant(layer, model.config, 1, 64)
    assert v.self_attn.k_proj.out_features == 16 and v.self_attn.q_proj.out_features == 32
    assert v.mlp.down_proj.in_features == 64 and v.self_attn.layer_idx == 0
    empty = layer_variant(layer, model.config, 0, 0)
    assert type(empty.self_attn).__name__ == "ZeroBlock" and type(empty.mlp).__name__ == "ZeroBlock"
    assert layer.mlp.down_proj.in_features == 96  # the source layer is untouched


def test_without_layers_shares_everything_else(tiny_llama):
    """The `rest` model: same embeddings/norm/lm_head objects, no layers, and the original keeps its layers."""
    rest = without_layers(tiny_llama)
    assert len(rest.model.layers) == 0 and len(tiny_llama.model.layers) == 3
    assert rest.lm_head is tiny_llama.lm_head and rest.model.embed_tokens is tiny_llama.model.embed_tokens
    ids = torch.randint(0, 128, (1, 5))
    with torch.inference_mode():
        out = rest(input_ids=ids, logits_to_keep=1).logits
        ref = tiny_llama.lm_head(tiny_llama.model.norm(tiny_llama.model.embed_tokens(ids)))[:, -1:]
    torch.testing.assert_close(out, ref)
    assert measure_ms(rest, DECODE, warmup=0, repeats=1)["median_ms"] > 0


def test_mlp_grid():
    g = mlp_grid(1536, "cpu")
    assert g[0] == 0 and g[-1] == 1536 and all(w % 64 == 0 for w in g) and len(g) == 25
    g = mlp_grid(14336, "cuda")
    assert g[-1] == 14336 and all(w % 256 == 0 for w in g) and len(g) <= 34
    g = mlp_grid(14337, "cuda")  # misaligned full width: still included, everything else aligned
    assert g[-1] == 14337 and all(w % 128 == 0 for w in g[:-1])
    assert mlp_grid(96, "cpu") == [0, 24, 48, 64, 72, 96]


def _table(att, mlp, overhead, L=4, rest=1.0):
    return LatencyTable(
        regime=Regime(),
        fingerprint={},
        rest_ms=rest,
        attention_ms=att,
        mlp_ms=mlp,
        num_layers=L,
        layer_overhead_ms=overhead,
    )


def test_block_entries_exact_at_measured_shapes():
    """Non-additive synthetic layer times (blocks overlap, as kernel launches and compute do on a GPU): the table
    reproduces every measured shape — the dense layer, each attention level with the full MLP, each width with
    full attention, a layer keeping one block — and a dropped layer costs 0."""
    K, W, grid = 3, 192, [0, 64, 128, 192]
    A = {0: 0.0, 1: 2.0, 2: 3.5, 3: 5.0}
    M = {0: 0.0, 64: 1.0, 128: 2.2, 192: 3.1}

    def t(k, w):
        return 0.7 + A[k] + M[w] - 0.4 * min(A[k], M[w])

    T = {(k, W): t(k, W) for k in range(K + 1)} | {(K, w): t(K, w) for w in grid}
    att, mlp, c = block_entries(T, K, W, grid, "anchored")
    assert att[0] == 0 and mlp[0] == 0
    tab = _table(att, mlp, c)
    for (k, w), ms in T.items():
        assert tab.layer_ms(k, w) == pytest.approx(ms)
    assert tab.layer_ms(0, 0) == 0
    assert att[K] + mlp[W] == pytest.approx(t(K, W))  # without the overhead term too, for kept-both layers
    # On additive times every shape is exact, measured or not, with either method.
    T = {(k, w): 0.7 + A[k] + M[w] for k in range(K + 1) for w in grid}
    for method in ("anchored", "blocks"):
        tab = _table(*block_entries(T, K, W, grid, method))
        for (k, w), ms in T.items():
            assert tab.layer_ms(k, w) == pytest.approx(ms if (k or w) else 0.0)
    with pytest.raises(ZipkdError, match="method"):
        block_entries(T, K, W, grid, "guess")
    back = LatencyTable.from_json(json.loads(json.dumps(tab.to_json())))
    assert back.layer_overhead_ms == pytest.approx(tab.layer_overhead_ms)


def test_profile_table_structure(tiny_llama):
    tab = profile_model(tiny_llama, PREFILL, **FAST)
    assert tab.attention_levels == [0, 1, 2]
    assert tab.mlp_levels == mlp_grid(96, "cpu")
    assert tab.dense_ms() == pytest.approx(
        tab.measured_dense_ms
    )  # entries scaled to reproduce the dense model
    assert tab.rest_ms > 0 and tab.meta["in_model_scale"] > 0
    assert tab.fingerprint["num_kv_heads"] == 2 and tab.fingerprint["device"] == "cpu"
    assert tab.fingerprint["threads"] == torch.get_num_threads()
    assert (
        all(v >= 0 for v in [*tab.mlp_ms.values(), *tab.attention_ms.values()]) and tab.attention_ms[0] == 0
    )


def test_profile_decode_and_roundtrip(tiny_llama, tmp_path):
    tab = profile_model(tiny_llama, DECODE, widths=[48], **FAST)
    assert tab.mlp_levels == [0, 48, 96] and tab.regime.context == 8
    back = LatencyTable.load(tab.save(tmp_path / "t.json"))
    assert back.to_json() == tab.to_json()


@pytest.mark.parametrize("shape", [(1, 64), (0, 96), (2, 0), (2, 96)])
def test_uniform_model_is_the_uniformly_pruned_model(tiny_llama, shape):
    """The in-model method times `uniform_model(k, w)`; it must compute what zipkd's surgery makes of every layer
    at (k, w) keeping the first groups/channels, prefill and decode, and leave the dense model alone."""
    from zipkd.models.adapters import adapter_for
    from zipkd.models.surgery import remove_attention, remove_mlp, slice_attention, slice_mlp

    k, w = shape
    dense_before = {n: p.clone() for n, p in tiny_llama.state_dict().items()}
    u = uniform_model(tiny_llama, k, w)
    ref = build_variant(tiny_llama, [(2, 96)] * 3, random.Random(0))  # a dense copy, then cut by hand
    ad = adapter_for(ref.config)
    for layer in ad.layers(ref):
        if k == 0:
            remove_attention(layer, ad)
        elif k < 2:
            slice_attention(layer, ad, 16, 2, list(range(k)))
        if w == 0:
            remove_mlp(layer, ad)
        elif w < 96:
            slice_mlp(layer, ad, torch.arange(w))
    ids = torch.randint(0, 128, (2, 7))
    with torch.inference_mode():
        a, b = u(input_ids=ids).logits, ref(input_ids=ids).logits
        assert torch.allclose(a, b, atol=1e-5)
        if k:  # decode over a cache: layer indices must be the model's own
            out = u(input_ids=ids, use_cache=True)
            step = u(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True).logits
            full = ref(input_ids=torch.cat([ids, ids[:, :1]], 1)).logits[:, -1:]
            assert torch.allclose(step, full, atol=1e-4)
    assert all(torch.equal(dense_before[n], p) for n, p in tiny_llama.state_dict().items())
    assert len(adapter_for(tiny_llama.config).layers(tiny_llama)) == 3


@pytest.mark.parametrize("regime", [PREFILL, DECODE])
def test_in_model_profile_is_consistent(tiny_llama, regime):
    tab = profile_model(tiny_llama, regime, method="in-model", widths=[48], **FAST)
    assert tab.meta["method"] == "in-model" and tab.mlp_levels == [0, 48, 96]
    assert tab.dense_ms() == pytest.approx(tab.measured_dense_ms)
    assert tab.attention_ms[0] == 0 and tab.mlp_ms[0] == 0
    assert set(tab.meta["layer_ms"]) >= {"0,96", "1,96", "2,0", "2,48"}  # anchored shapes, as whole models


def test_default_methods():
    from zipkd.latency.profile import default_method

    assert default_method(torch.device("cpu"), DECODE) == "blocks"
    assert default_method(torch.device("cuda"), PREFILL) == "anchored"
    assert default_method(torch.device("cuda"), DECODE) == "in-model"
    with pytest.raises(ZipkdError, match="unknown profiling method"):
        block_entries({}, 1, 1, [], "magic")


def test_profile_refuses_pruned_or_misplaced_model(tiny_llama):
    pruned = build_variant(tiny_llama, [(1, 64)] * 3, random.Random(0))
    with pytest.raises(ZipkdError, match="base model"):
        profile_model(pruned, PREFILL, **FAST)
    with pytest.raises(ZipkdError, match="dtype"):
        profile_model(tiny_llama, Regime(dtype="bfloat16"), **FAST)


# ---------------------------------------------------------------- fingerprints, cache, bad input


def test_bad_devices_and_regimes():
    with pytest.raises(ZipkdError, match="unknown device"):
        parse_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ZipkdError, match="no GPU"):
            parse_device("cuda")
        assert device_fingerprint(Regime(device="cuda"), strict=False)["device"] == "cuda"
    with pytest.raises(ZipkdError, match="batch"):
        Regime(batch=0)
    with pytest.raises(ZipkdError, match="regime"):
        Regime(regime="train")
    for bad, match in [
        ({"device": "tpu"}, "unknown device"),
        ({"device": "cuda:x"}, "unknown device"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"runtime": "onnx"}, "unknown runtime"),
    ]:
        with pytest.raises(ZipkdError, match=match):
            Regime(**bad)
    assert Regime(device="cuda:1", dtype="bfloat16", runtime="cudagraphs").device == "cuda:1"  # format only


def test_quantized_regime_times_quantized_blocks(tiny_llama):
    """A torch regime's `quantization` reaches the latency layer through the quantizer `zipkd.quantize`
    registers (the latency layer imports no quantizer)."""
    assert module_quantizer(None) is None
    tab = profile_model(tiny_llama, Regime(seq_len=8, quantization="quanto-int8"), widths=[48], **FAST)
    assert tab.regime.quantization == "quanto-int8" and tab.dense_ms() > 0
    assert tab.fingerprint["quantization"] == "quanto-int8"


def test_pruned_model_shares_base_fingerprint(tiny_llama):
    pruned = build_variant(tiny_llama, [(1, 64), (0, 0), (2, 0)], random.Random(0))
    assert model_fingerprint(pruned.config) == model_fingerprint(tiny_llama.config)
    assert table_cache_path(pruned.config, PREFILL) == table_cache_path(tiny_llama.config, PREFILL)


def test_load_or_profile_caches_and_checks(tiny_llama, cache_env, monkeypatch, tmp_path):
    import zipkd.latency.profile as prof

    tab = load_or_profile(tiny_llama, PREFILL)
    assert tab.meta["cached"] is False and (cache_env / "tables").is_dir()

    def boom(*a, **k):
        raise AssertionError("should have used the cached table")

    monkeypatch.setattr(prof, "profile_model", boom)
    again = load_or_profile(tiny_llama, PREFILL)
    assert again.meta["cached"] is True and again.rest_ms == pytest.approx(tab.rest_ms)
    # Another regime is another cache entry.
    with pytest.raises(AssertionError):
        load_or_profile(tiny_llama, Regime(seq_len=8))
    # A table from another model is refused with the differences named, unless forced.
    other = tiny_model(hidden_size=32, head_dim=8)
    with pytest.raises(ZipkdError, match="hidden_size: table has 64, here 32"):
        load_or_profile(other, PREFILL, table=tab.save(tmp_path / "t.json"))
    assert load_or_profile(other, PREFILL, table=tmp_path / "t.json", accept_mismatch=True).num_layers == 3
    # Same model, other device fingerprint (threads) -> refused too.
    tab.fingerprint["threads"] = 999
    with pytest.raises(ZipkdError, match="threads"):
        load_or_profile(tiny_llama, PREFILL, table=tab)


def test_method_choice_is_cached_apart(tiny_llama, cache_env):
    # The device's default method shares the plain cache entry; another method gets its own.
    assert table_cache_path(tiny_llama.config, PREFILL, "blocks") == table_cache_path(
        tiny_llama.config, PREFILL
    )
    other = table_cache_path(tiny_llama.config, PREFILL, "in-model")
    assert other != table_cache_path(tiny_llama.config, PREFILL) and "-in-model-" in other.name
    tab = load_or_profile(tiny_llama, PREFILL, method="in-model")
    assert tab.meta["method"] == "in-model" and tab.meta["cache_path"] == str(other)
    assert load_or_profile(tiny_llama, PREFILL, method="in-model").meta["cached"] is True
    assert load_or_profile(tiny_llama, PREFILL).meta["method"] == "blocks"
    with pytest.raises(ZipkdError, match="unknown profiling method 'fast'"):
        load_or_profile(tiny_llama, PREFILL, method="fast")


# ---------------------------------------------------------------- validation


def _synthetic_table(L=6, K=3, W=256) -> LatencyTable:
    grid = [0, 64, 128, 192, 256]
    return LatencyTable(
        regime=Regime(),
        fingerprint={},
        rest_ms=1.0,
        num_layers=L,
        attention_ms={k: 0.5 * k for k in range(K + 1)},
        mlp_ms={w: w / 64 for w in grid},
    )


@pytest.mark.parametrize("target", [1.2, 2.0, 3.0])
def test_random_shapes_reach_target(target):
    tab = _synthetic_table()
    s1 = random_shapes(tab, target, random.Random(5), 3, 256)
    assert s1 == random_shapes(tab, target, random.Random(5), 3, 256)  # reproducible
    assert len(s1) == 6 and any(s != (0, 0) for s in s1)
    assert all(k in tab.attention_levels and w in tab.mlp_levels for k, w in s1)
    sp = tab.predict_speedup([{"kv_heads": k, "intermediate": w} for k, w in s1])
    assert target <= sp < target * 1.6


def test_random_shapes_never_empty_the_model():
    tab = _synthetic_table()
    shapes = random_shapes(tab, 1000.0, random.Random(0), 3, 256)  # unreachable target
    assert sum(s != (0, 0) for s in shapes) == 1


def test_build_variant_has_requested_shapes(tiny_llama):
    shapes = [(1, 48), (0, 0), (0, 96)]
    v = build_variant(tiny_llama, shapes, random.Random(1))
    assert [(s.kv_heads, s.intermediate) for s in layer_shapes(v)] == [(1, 48), (0, 96)]
    assert len(layer_shapes(tiny_llama)) == 3  # the dense model is untouched
    with torch.inference_mode():
        v(input_ids=torch.randint(0, 128, (1, 6)))


def test_validate_table_reports(tiny_llama):
    tab = profile_model(tiny_llama, PREFILL, **FAST)
    rep = validate_table(tiny_llama, tab, n=3, speedup_range=(1.2, 2.0), warmup=0, repeats=1, group=2)
    assert len(rep.variants) == 3
    for v in rep.variants:
        assert v.predicted_ms == pytest.approx(tab.predict(v.shapes))
        assert all(
            s["kv_heads"] in tab.attention_levels and s["intermediate"] in tab.mlp_levels for s in v.shapes
        )
        assert v.measured_ms > 0 and v.measured_speedup > 0
    js = rep.to_json()
    assert js["median_abs_speedup_error"] >= 0 and len(js["variants"]) == 3


# ---------------------------------------------------------------- CLI


runner = CliRunner()


def _saved(tmp_path, name="m", **over):
    from zipkd.models.io import save_model

    return str(save_model(tiny_model(**over), None, tmp_path / name, stage="test"))


def test_cli_profile_json(tmp_path, cache_env):
    from zipkd.cli import app

    m = _saved(tmp_path)
    out = tmp_path / "table.json"
    res = runner.invoke(
        app,
        [
            "profile",
            m,
            "--seq-len",
            "8",
            "--repeats",
            "1",
            "--json",
            "-o",
            str(out),
            "--validate",
            "--variants",
            "2",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["table"]["num_layers"] == 3 and len(data["validation"]["variants"]) == 2
    assert LatencyTable.load(out).num_layers == 3
    # Writing over an existing table needs --force.
    res = runner.invoke(app, ["profile", m, "--seq-len", "8", "--repeats", "1", "-o", str(out)])
    assert res.exit_code == 2 and "--force" in res.stderr
    res = runner.invoke(
        app, ["profile", m, "--seq-len", "8", "--repeats", "1", "--method", "anchored", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["table"]["meta"]["method"] == "anchored"


def test_cli_profile_bad_input(tmp_path, cache_env):
    from zipkd.cli import app

    m = _saved(tmp_path)
    res = runner.invoke(app, ["profile", m, "--device", "tpu"])
    assert res.exit_code == 2 and "unknown device 'tpu'" in res.stderr
    if not torch.cuda.is_available():
        res = runner.invoke(app, ["profile", m, "--device", "cuda"])
        assert res.exit_code == 2 and "no GPU" in res.stderr
    res = runner.invoke(app, ["profile", m, "--batch", "0"])
    assert res.exit_code == 2 and "batch" in res.stderr
    res = runner.invoke(app, ["profile", m, "--runtime", "compile"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["profile", m, "--method", "fast"])
    assert res.exit_code == 2 and "unknown method 'fast'" in res.stderr
    tab = profile_model(tiny_model(hidden_size=32, head_dim=8), Regime(seq_len=8), **FAST)
    tab.save(tmp_path / "other.json")
    res = runner.invoke(app, ["profile", m, "--table", str(tmp_path / "other.json")])
    assert res.exit_code == 2 and "does not match" in res.stderr and "hidden_size" in res.stderr
    assert "Traceback" not in res.output


# ---------------------------------------------------------------- real model


@pytest.mark.slow
def test_real_model_table(real_model):
    """SmolLM2, prefill 1×128: every level present, the dense model reproduced, and a gross fact that survives a
    busy machine: the widest third of the MLP grid costs more on average than the narrowest third (≈ 5× the work)."""
    tab = profile_model(real_model, Regime(seq_len=128), warmup=1, repeats=3)
    assert tab.attention_levels == [0, 1, 2, 3] and len(tab.mlp_levels) == 25
    entries = [tab.mlp_ms[w] for w in tab.mlp_levels[1:]]
    assert sum(entries[-8:]) > sum(entries[:8])
    assert tab.dense_ms() == pytest.approx(tab.measured_dense_ms)
