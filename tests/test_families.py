"""Model families beyond Llama (issue #19): Gemma 2 and 3 (sandwich norms, soft-caps, sliding/global layers, q/k
norms), Phi-3 (fused qkv/gate_up, partial rotary, long-rope), OLMo-2 (post-norms, q/k norms over the whole
projection) and Granite (multipliers), plus Qwen2's biases. Each on a tiny random config with its distinguishing
features on (`zipkd.models.tiny.FAMILY_DEFAULTS`): round trips and heterogeneous surgery reload bit-exact,
surgery equals a naive slice written here by indexing the weights, KV-cached greedy decoding equals
recomputation, OBS pruning through the prune API, profiling, recovery, perplexity, GGUF export (llama.cpp logits
where llama-cpp-python is installed) and GGUF input refusals."""

from __future__ import annotations

import copy
import json
import math
import time

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from zipkd.errors import ZipkdError
from zipkd.models.adapters import ADAPTERS, adapter_for
from zipkd.models.io import GGUF_ARCHS, LoadedModel, check_gguf_input, load_model, save_model
from zipkd.models.surgery import (
    ZeroBlock,
    drop_layers,
    layer_shapes,
    remove_attention,
    remove_mlp,
    slice_attention,
    slice_mlp,
    sync_config,
)
from zipkd.models.tiny import PHI3_LONG_ROPE, byte_tokenizer, char_tokenizer, random_model

FAMILIES = ["gemma2", "gemma3_text", "phi3", "olmo2", "granite"]
EXTRA = {"phi3": PHI3_LONG_ROPE}  # Phi-3.5-style: partial rotary and long-rope scaling
HD, GROUP, KV, WIDTH = 8, 2, 2, 64  # tiny shape of `random_model`: 4 heads over 2 KV heads, MLP 64
GGUF_ARCH = {
    "gemma2": "gemma2",
    "gemma3_text": "gemma3",
    "phi3": "phi3",
    "olmo2": "olmo2",
    "granite": "granite",
}


def tiny(family: str, layers: int = 5, seed: int = 0, **kw):
    """Norms jittered around their identity value, so a norm sliced or placed wrongly changes the logits."""
    kw = {"weight_std": 0.25, "norm_std": 0.2, **EXTRA.get(family, {}), **kw}
    return random_model(family, seed, num_hidden_layers=layers, **kw)


def ids(n: int = 2, t: int = 12, seed: int = 1, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.inference_mode()
def logits(model, x):
    return model(x).logits


def greedy(model, prompt, n: int = 8) -> torch.Tensor:
    """Uncached greedy decoding: the whole sequence recomputed for every token."""
    seq = prompt
    for _ in range(n):
        seq = torch.cat([seq, logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


class LM:
    def __init__(self, model, tokenizer, path=None):
        self.model, self.tokenizer, self.path, self.name = model, tokenizer, path, "tiny"


# ---------------------------------------------------------------- surgery: naive reference


def _rows(heads, hd: int = HD) -> list[int]:
    return [h * hd + d for h in heads for d in range(hd)]


def naive_layer(family: str, sd: dict, prefix: str, keep_groups=None, keep_channels=None) -> dict:
    """The expected tensors of one sliced layer, indexing the dense state dict `sd` by hand (python index lists,
    no zipkd code): a KV group keeps its GROUP query heads; fused projections keep the same rows of each part;
    OLMo-2's q/k norms (over the whole projection) keep the kept rows, Gemma 3's (over head_dim) stay whole."""
    out = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    if keep_groups is not None:
        q_rows = _rows([g * GROUP + i for g in keep_groups for i in range(GROUP)])
        kv_rows = _rows(keep_groups)
        a = "self_attn."
        if family == "phi3":
            w = out[a + "qkv_proj.weight"]
            q, k, v = (
                w[: KV * GROUP * HD],
                w[KV * GROUP * HD : (KV * GROUP + KV) * HD],
                w[(KV * GROUP + KV) * HD :],
            )
            out[a + "qkv_proj.weight"] = torch.cat([q[q_rows], k[kv_rows], v[kv_rows]])
        else:
            for name, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
                for kind in ("weight", "bias"):
                    if f"{a}{name}.{kind}" in out:
                        out[f"{a}{name}.{kind}"] = out[f"{a}{name}.{kind}"][rows]
        out[a + "o_proj.weight"] = out[a + "o_proj.weight"][:, q_rows]
        if family == "olmo2":
            out[a + "q_norm.weight"] = out[a + "q_norm.weight"][q_rows]
            out[a + "k_norm.weight"] = out[a + "k_norm.weight"][kv_rows]
    if keep_channels is not None:
        m = "mlp."
        if family == "phi3":
            w = out[m + "gate_up_proj.weight"]
            out[m + "gate_up_proj.weight"] = torch.cat([w[:WIDTH][keep_channels], w[WIDTH:][keep_channels]])
        else:
            out[m + "gate_proj.weight"] = out[m + "gate_proj.weight"][keep_channels]
            out[m + "up_proj.weight"] = out[m + "up_proj.weight"][keep_channels]
        out[m + "down_proj.weight"] = out[m + "down_proj.weight"][:, keep_channels]
    return out


# Each block's norms in the family's decoder layer (pre-norm, post-norm), written out from transformers' code.
GEMMA_NORMS = {
    "attention": ["input_layernorm", "post_attention_layernorm"],
    "mlp": ["pre_feedforward_layernorm", "post_feedforward_layernorm"],
}
LLAMA_NORMS = {"attention": ["input_layernorm"], "mlp": ["post_attention_layernorm"]}
BLOCK_NORMS = {
    "gemma2": GEMMA_NORMS,
    "gemma3_text": GEMMA_NORMS,
    "phi3": LLAMA_NORMS,
    "granite": LLAMA_NORMS,
    "olmo2": {"attention": ["post_attention_layernorm"], "mlp": ["post_feedforward_layernorm"]},
}


def naive_removed(sd: dict, prefix: str, family: str, block: str) -> dict:
    """One layer's tensors without a block: its projections and its pre- and post-norms are gone."""
    gone = ["self_attn." if block == "attention" else "mlp.", *(n + "." for n in BLOCK_NORMS[family][block])]
    return {k: v for k, v in sd.items() if not any(k.startswith(g) for g in gone)}


def heterogeneous(family: str, model):
    """Layer 0 loses its attention (the KV cache has no layer 0: with Gemma's mixed layer types a placeholder slot),
    layer 1 keeps KV group 1, layer 2 every third MLP channel, layer 3 loses its MLP, layer 4 is dropped."""
    ad = adapter_for(model.config)
    layers = ad.layers(model)
    remove_attention(layers[0], ad)
    slice_attention(layers[1], ad, HD, GROUP, [1])
    slice_mlp(layers[2], ad, list(range(0, WIDTH, 3)))
    remove_mlp(layers[3], ad)
    drop_layers(model, [4])
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_exact(tmp_path, family):
    model = tiny(family, layers=3)
    out = save_model(model, None, tmp_path / "m", stage="test")
    back = load_model(out, tokenizer=False).model
    assert torch.equal(logits(model, ids()), logits(back, ids()))
    if (
        family == "phi3"
    ):  # partial rotary and long-rope survive, also past the original context (long factors)
        assert back.config.rope_parameters == model.config.rope_parameters
        assert back.config.rope_parameters["partial_rotary_factor"] == 0.5
        assert back.config.rope_parameters["rope_type"] == "longrope"
        long = ids(1, 80)
        assert torch.equal(logits(model, long), logits(back, long))
    if family == "granite":
        for key in ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling"):
            assert getattr(back.config, key) == getattr(model.config, key) != 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_heterogeneous_surgery_matches_naive_slice_and_reloads(tmp_path, family):
    model = tiny(family)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    heterogeneous(family, model)
    assert [(s.kv_heads, s.intermediate) for s in layer_shapes(model)] == [(0, 64), (1, 64), (2, 22), (2, 0)]
    p = "model.layers."
    expected = {}
    for j, layer_sd in enumerate(
        [
            naive_removed(naive_layer(family, dense, f"{p}0."), f"{p}0.", family, "attention"),
            naive_layer(family, dense, f"{p}1.", keep_groups=[1]),
            naive_layer(family, dense, f"{p}2.", keep_channels=list(range(0, WIDTH, 3))),
            naive_removed(naive_layer(family, dense, f"{p}3."), f"{p}3.", family, "mlp"),
        ]
    ):
        expected.update({f"{p}{j}.{k}": v for k, v in layer_sd.items()})
    expected.update({k: v for k, v in dense.items() if not k.startswith(p)})
    got = model.state_dict()
    assert sorted(got) == sorted(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected), [
        k for k in expected if not torch.equal(got[k], expected[k])
    ]
    ad = adapter_for(model.config)
    layers = ad.layers(model)
    for layer, block in ((layers[0], "attention"), (layers[3], "mlp")):
        assert all(isinstance(getattr(layer, n), nn.Identity) for n in BLOCK_NORMS[family][block])
    assert isinstance(ad.attention(layers[0]), ZeroBlock) and isinstance(ad.mlp_block(layers[3]), ZeroBlock)
    if family.startswith(
        "gemma"
    ):  # mixed layer types: attention keeps its position, layer 0's slot a placeholder
        assert [ad.attention(lay).layer_idx for lay in layers] == [0, 1, 2, 3]
        assert "kv_sharing_modes" not in model.config.to_dict()
    else:  # compact cache indices over the layers with attention
        assert ad.attention(layers[0]).layer_idx is None
        assert [ad.attention(lay).layer_idx for lay in layers[1:]] == [0, 1, 2]

    x = ids()
    out = save_model(model, None, tmp_path / "het", stage="test")
    back = load_model(out, tokenizer=False).model
    assert torch.equal(logits(model, x), logits(back, x))
    assert layer_shapes(back) == layer_shapes(model)
    # KV-cached greedy decoding (14 tokens: past Gemma's sliding window of 4) equals recomputation, reloaded too.
    prompt = ids(1, 6)
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(cached, greedy(model, prompt))
    assert torch.equal(cached, back.generate(prompt, max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text"])
def test_a_model_saved_with_dummy_cache_slots_loads_and_decodes(tmp_path, family):
    """Earlier zipkd wrote `kv_sharing_modes` ("reuse" for a removed attention block), which transformers turns
    into `DummyLayer` cache slots; from transformers 5.25 a `DummyLayer` in slot 0 breaks cached decoding. The
    loader drops the field: cached greedy decoding equals recomputation."""
    model = tiny(family)
    heterogeneous(family, model)
    out = save_model(model, None, tmp_path / "old", stage="test")
    cfg = json.loads((out / "config.json").read_text())
    cfg["kv_sharing_modes"] = ["reuse", None, None, None]
    (out / "config.json").write_text(json.dumps(cfg))
    back = load_model(out, tokenizer=False).model
    assert "kv_sharing_modes" not in back.config.to_dict()
    prompt = ids(1, 6)
    assert torch.equal(back.generate(prompt, max_new_tokens=8, do_sample=False), greedy(back, prompt))


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3", "granite"])
def test_heterogeneous_surgery_computes_the_zeroed_model(family):
    """A functional naive reference: slicing equals zeroing the removed heads' o_proj columns and channels'
    down_proj columns, a removed block equals its zeroed output projection (its post-norm of zero is zero).
    Not for OLMo-2, whose q/k norms over the whole projection renormalise the kept heads when others go."""
    model = tiny(family)
    ref = copy.deepcopy(model)
    L = adapter_for(ref.config).layers(ref)
    with torch.no_grad():
        L[1].self_attn.o_proj.weight[:, _rows([0, 1])] = 0  # KV group 0 and its query heads
        L[2].mlp.down_proj.weight[:, [c for c in range(WIDTH) if c % 3]] = 0
        for i in (0, 4):
            L[i].self_attn.o_proj.weight.zero_()
        for i in (3, 4):
            L[i].mlp.down_proj.weight.zero_()
    heterogeneous(family, model)
    torch.testing.assert_close(logits(model, ids()), logits(ref, ids()), rtol=1e-5, atol=1e-5)


def test_qwen2_biases_are_sliced_with_their_heads():
    model = random_model("qwen2", 0, weight_std=0.25)
    attn = model.model.layers[1].self_attn
    with torch.no_grad():
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.bias.normal_(0, 0.5)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    ref = copy.deepcopy(model)
    ref.model.layers[1].self_attn.o_proj.weight.data[:, _rows([0, 1])] = 0
    slice_attention(model.model.layers[1], adapter_for(model.config), HD, GROUP, [1])
    sync_config(model)
    want = naive_layer("qwen2", dense, "model.layers.1.", keep_groups=[1])
    for name in ("q_proj", "k_proj", "v_proj"):
        got = getattr(model.model.layers[1].self_attn, name).bias
        assert torch.equal(got, want[f"self_attn.{name}.bias"])
    assert torch.equal(
        model.model.layers[1].self_attn.q_proj.bias, dense["model.layers.1.self_attn.q_proj.bias"][16:]
    )
    torch.testing.assert_close(logits(model, ids()), logits(ref, ids()), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- pruning, profiling, recovery, evaluation

TEXT = [
    " ".join(
        f"The {a} cat number {i} sat near the river at {i % 12} o'clock."
        for i, a in enumerate(["red", "old", "big", "small"] * 50)
    )
]


def table(layers: int = 3):
    from zipkd.latency.table import LatencyTable, Regime

    att = {k: 0.3 * k for k in range(KV + 1)}
    mlp = {w: 1.2 * w / WIDTH for w in range(0, WIDTH + 1, 16)}
    return LatencyTable(Regime(), {}, 0.5, att, mlp, layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_obs_prune_through_the_api_reloads_exact(tmp_path, family):
    """ZipLM OBS to 2x on a hand-made table; the sequential refit's activations are what the pruned model
    computes (the adapter's residual layout: post-norms, residual scale, OLMo-2's refit on renormalised heads)."""
    from zipkd.prune import PruneConfig, prune, save_pruned
    from zipkd.prune.api import build, calibration_tokens
    from zipkd.prune.driver import apply_choice
    from zipkd.prune.search import select

    lm = LM(tiny(family, layers=3), char_tokenizer())
    config = PruneConfig(target_speedup=2.0, samples=4, calib_len=32, batch_size=4, fisher_samples=2)
    tab = table()
    (r,) = prune(lm, config, calib_texts=TEXT, table=tab)
    assert r.predicted_speedup >= 2.0 * (1 - 1e-9) and tab.predict(r.shapes) <= tab.dense_ms() / 2 * (
        1 + 1e-9
    )
    (folder,) = save_pruned([r], lm, tmp_path / "p", config)
    back = load_model(folder, tokenizer=False).model
    x = ids(2, 20)
    assert torch.isfinite(logits(r.model, x)).all()
    assert torch.equal(logits(back, x), logits(r.model, x))

    db, first = build(lm, config, tab, TEXT)
    shapes = select(db, tab, 1.8).shapes
    acts = first.clone()
    pruned = apply_choice(lm.model, db, shapes, acts, "sequential")
    tokens, _ = calibration_tokens(lm, config, TEXT)
    seen = []
    last = adapter_for(pruned.config).layers(pruned)[-1]
    hook = last.register_forward_hook(
        lambda _m, _i, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        with torch.inference_mode():
            for i in range(0, tokens.shape[0], config.batch_size):
                pruned.model(tokens[i : i + config.batch_size])
    finally:
        hook.remove()
    torch.testing.assert_close(torch.cat(seen), torch.cat(acts.hidden), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_latency_profile_and_uniform_model(family):
    from zipkd.latency.profile import profile_model, uniform_model
    from zipkd.latency.table import Regime

    model = tiny(family, layers=3)
    tab = profile_model(model, Regime(seq_len=16), widths=[32], warmup=1, repeats=3)  # repeats: a busy CPU
    assert (
        tab.mlp_levels == [0, 32, 64]
        and tab.attention_ms[0] == 0
        and tab.fingerprint["architecture"] == family
    )
    x = ids(2, 7)
    for k, w in ((1, 32), (2, 0), (0, 64)):
        ref = copy.deepcopy(model)
        ad = adapter_for(ref.config)
        for layer in ad.layers(ref):
            if k == 0:
                remove_attention(layer, ad)
            elif k < KV:
                slice_attention(layer, ad, HD, GROUP, list(range(k)))
            if w == 0:
                remove_mlp(layer, ad)
            elif w < WIDTH:
                slice_mlp(layer, ad, torch.arange(w))
        torch.testing.assert_close(
            logits(uniform_model(model, k, w), x), logits(ref, x), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("family", FAMILIES)
def test_recovery_steps_and_perplexity(tmp_path, family, monkeypatch):
    """Two distillation steps on a pruned model (teacher: its dense base), then perplexity before and after."""
    from zipkd.evaluate.perplexity import perplexity
    from zipkd.recover.api import RecoverConfig, recover
    from zipkd.recover.data import RewriteSettings
    from zipkd.recover.train import TrainConfig

    monkeypatch.setattr("zipkd.recover.data.distill_cache_dir", lambda: tmp_path / "distilled")
    rows = [
        {"instruction": "What is 2 + 3?", "response": "2 + 3 = 5. So the answer is 5."},
        {"instruction": "Say hello.", "response": "Hello there, friend."},
    ] * 3
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "mix.txt").write_text(
        "\n\n".join(f"Paragraph {i}: the river runs past the mill." for i in range(40))
    )
    tok = char_tokenizer()
    model = tiny(family, layers=4, weight_std=0.2, norm_std=0.1)
    dense = save_model(model, tok, tmp_path / "dense", stage="convert")
    ad = adapter_for(model.config)
    layers = ad.layers(model)
    slice_attention(layers[0], ad, HD, GROUP, [0])
    slice_mlp(layers[1], ad, list(range(32)))
    remove_attention(layers[2], ad)
    drop_layers(model, [3])
    pruned = save_model(model, tok, tmp_path / "pruned", stage="prune", inputs={"model": dense})
    train = TrainConfig(
        steps=2,
        batch_size=2,
        checkpoint_every=100,
        warmup_steps=1,
        lr=3e-3,
        kd_weight=0.5,
        mix_ratio=0.5,
        max_seq_len=64,
    )
    config = RecoverConfig(
        data=str(tmp_path / "d.jsonl"),
        mix_text=str(tmp_path / "mix.txt"),
        max_examples=None,
        distill=False,
        rewrite=RewriteSettings(max_new_tokens=8, batch_size=6),
        train=train,
    )
    out = recover(str(pruned), config, tmp_path / "rec")
    before, after = load_model(pruned), load_model(out)
    assert layer_shapes(after.model) == layer_shapes(before.model)
    text = ["The river runs past the mill and the miller counts sacks of flour. " * 20]
    p0 = perplexity(before.model, tok, text, max_length=32, max_tokens=256)["perplexity"]
    p1 = perplexity(after.model, tok, text, max_length=32, max_tokens=256)["perplexity"]
    assert math.isfinite(p0) and math.isfinite(p1) and p1 < p0


# ---------------------------------------------------------------- GGUF export


def export_model(family: str, mode: str = "dense"):
    """A tiny model llama.cpp can hold (vocabulary of `byte_tokenizer`, head_dim 16); `mode`: dense, uniform
    (every layer cut alike: KV group 1 where the family's graph takes pruned heads, half the MLP) or het."""
    model = random_model(
        family,
        0,
        weight_std=0.15,
        norm_std=0.2,
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        head_dim=16,
    )
    model.config._name_or_path = "tiny-random"  # llama.cpp keys vocabulary quirks on names such as "phi3"
    ad = adapter_for(model.config)
    if mode != "dense":
        for layer in ad.layers(model):
            if family not in ("phi3", "olmo2"):
                slice_attention(layer, ad, 16, GROUP, [1])
            slice_mlp(layer, ad, list(range(0, 128, 2)))
        if mode == "het":
            remove_mlp(ad.layers(model)[1], ad)
        sync_config(model)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_export_names_the_family_architecture(tmp_path, family):
    from zipkd.export.gguf import write_f32
    from zipkd.models.gguf_file import gguf_header

    for mode in ("dense", "uniform"):
        model = export_model(family, mode)
        path = tmp_path / f"{mode}.gguf"
        assert write_f32(model, None, None, path) == GGUF_ARCH[family]
        header = gguf_header(path)
        assert header["fields"]["general.architecture"] == GGUF_ARCH[family]
        assert header["fields"][f"{GGUF_ARCH[family]}.block_count"] == 3
        assert header["fields"][f"{GGUF_ARCH[family]}.feed_forward_length"] == (
            128 if mode == "dense" else 64
        )
    if family == "granite":
        assert (
            header["fields"]["granite.logit_scale"] == 4.0
            and header["fields"]["granite.residual_scale"] == 0.5
        )
    if family == "gemma2":
        assert header["fields"]["gemma2.attn_logit_softcapping"] == 50.0
        assert header["fields"]["gemma2.attention.sliding_window"] == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_export_refuses_heterogeneous_layouts_in_one_line(tmp_path, family):
    from zipkd.export.gguf import write_f32

    with pytest.raises(ZipkdError) as err:
        write_f32(export_model(family, "het"), None, None, tmp_path / "het.gguf")
    msg = str(err.value)
    assert "\n" not in msg and "no llama.cpp mapping" in msg and "--layout uniform" in msg
    assert not (tmp_path / "het.gguf").exists()
    if family in ("phi3", "olmo2"):  # llama.cpp's graph takes the head size from hidden / heads
        model = export_model(family)
        ad = adapter_for(model.config)
        for layer in ad.layers(model):
            slice_attention(layer, ad, 16, GROUP, [0])
        sync_config(model)
        with pytest.raises(ZipkdError, match="pruned attention heads have no llama.cpp mapping"):
            write_f32(model, None, None, tmp_path / "heads.gguf")


@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_logits_match_llamacpp(tmp_path, family):
    """The exported GGUF in llama.cpp (f32, KV cache in f32): logits loosely equal torch's. 12 tokens run past
    Gemma's sliding window of 4. Gemma differs by up to ~3e-3 (logits up to ~70: GELU-tanh, soft-caps in f32);
    a wrong norm offset, permutation or missing block moves logits by whole units."""
    pytest.importorskip("llama_cpp")
    from zipkd.export.api import ExportConfig, export
    from zipkd.runtimes.llamacpp import open_model

    tokens = [5, 77, 200, 13, 99, 42, 250, 3, 180, 64, 7, 120]
    for mode in ("dense", "uniform"):
        model = export_model(family, mode)
        r = export(
            LoadedModel(model, byte_tokenizer(), None, "tiny"),
            ExportConfig(quantization="f32"),
            tmp_path / f"{mode}.gguf",
        )
        assert r.arch == GGUF_ARCH[family]
        with open_model(r.path, threads=2, n_ctx=64, logits_all=True, kv_f32=True) as em:
            em.eval(tokens)
            engine = em.logits(0, len(tokens))
        np.testing.assert_allclose(
            engine, logits(model, torch.tensor([tokens]))[0].numpy(), atol=1e-2, rtol=0
        )


def _fake_gguf(path, arch: str) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(8)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_unsupported_gguf_is_refused_before_dequantizing(tmp_path, monkeypatch):
    from zipkd.cli.app import app

    def never(*_a, **_k):
        raise AssertionError("the GGUF was read past its header")

    monkeypatch.setattr("zipkd.models.io.load_gguf", never)
    path = tmp_path / "mamba.gguf"
    _fake_gguf(path, "mamba")
    for args in (["info", str(path)], ["prune", str(path), "-o", str(tmp_path / "out")]):
        t0 = time.perf_counter()
        result = CliRunner().invoke(app, args)
        assert time.perf_counter() - t0 < 5 and result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in result.output
        assert "unsupported architecture 'mamba'" in lines[0] and "gemma2" in lines[0] and "phi3" in lines[0]
    assert not (tmp_path / "out").exists()


def test_gguf_input_accepts_the_families_transformers_reads(tmp_path):
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    assert set(GGUF_ARCHS) <= set(GGUF_SUPPORTED_ARCHITECTURES) and set(GGUF_ARCHS.values()) <= set(ADAPTERS)
    for arch in ("gemma2", "gemma3", "phi3", "llama"):
        _fake_gguf(tmp_path / f"{arch}.gguf", arch)
        assert check_gguf_input(tmp_path / f"{arch}.gguf")["fields"]["general.architecture"] == arch
    for arch in ("olmo2", "granite"):  # zipkd prunes them, but transformers cannot read their GGUFs
        _fake_gguf(tmp_path / f"{arch}.gguf", arch)
        with pytest.raises(ZipkdError, match="model folders of .*olmo2"):
            check_gguf_input(tmp_path / f"{arch}.gguf")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_and_the_uniform_layout(family):
    """The baselines (magnitude reads Phi-3's fused projections too) and `--layout uniform` on every family."""
    from zipkd.prune import PruneConfig, prune

    lm = LM(tiny(family, layers=3), char_tokenizer())
    tab = table()
    x = ids(2, 20)
    for method, layout in (
        ("magnitude", "heterogeneous"),
        ("wanda-sp", "heterogeneous"),
        ("zipkd", "uniform"),
    ):
        config = PruneConfig(
            target_speedup=1.5, method=method, layout=layout, samples=4, calib_len=32, fisher_samples=2
        )
        (r,) = prune(lm, config, calib_texts=TEXT, table=tab)
        assert tab.predict(r.shapes) <= tab.dense_ms() / 1.5 * (1 + 1e-9), method
        assert torch.isfinite(logits(r.model, x)).all(), method
        if layout == "uniform":
            kept = {(s.kv_heads, s.intermediate) for s in r.shapes if not s.empty}
            assert len(kept) == 1 and min(next(iter(kept))) >= 1


@pytest.mark.parametrize("family", FAMILIES)
def test_recovery_logits_are_the_models_logits(family):
    """What recovery trains on is the model's own output (Granite's logits scaling, Gemma 2's soft-cap), and
    LoRA adapts every projection of the family (Phi-3's fused ones included)."""
    from zipkd.recover.train import SelectedLogits, lora_targets

    model = tiny(family, layers=2, weight_std=0.2).eval()
    x = ids(2, 12)
    select = torch.ones(2, 12, dtype=torch.bool)
    with torch.inference_mode():
        ref = model(x).logits.reshape(-1, model.config.vocab_size)
        got = SelectedLogits(model)(x, torch.ones_like(x), select)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names.discard("lm_head")
    assert set(lora_targets(model)) == names


@pytest.mark.parametrize("family", ["llama", "qwen2", *FAMILIES])
def test_packed_rows_compute_each_sequence_alone(family):
    """Recovery packs several sequences into one row (position ids restart per sequence): every sequence's
    hidden states equal those of the sequence run alone, sliding-window layers included (Gemma's window is
    4 tokens here, shorter than the sequences)."""
    from zipkd.recover.data import TrainSeq
    from zipkd.recover.train import SelectedHidden, pack

    model = tiny(family, layers=2, weight_std=0.2).eval()
    lengths = [9, 5, 7, 3, 12]
    seqs = [TrainSeq(ids(1, n, seed=10 + i)[0].tolist(), [True] * n) for i, n in enumerate(lengths)]
    x, attn, target, pos = pack(seqs, 0, 16)
    assert x.shape[0] < len(seqs)  # sequences do share rows
    head = SelectedHidden(model)
    with torch.inference_mode():
        packed = head(x, attn, attn.bool(), pos)
        alone = torch.cat(
            [
                head(
                    torch.tensor([s.ids]),
                    torch.ones(1, len(s.ids)),
                    torch.ones(1, len(s.ids), dtype=torch.bool),
                )
                for s in seqs
            ]
        )
    # `packed` follows the rows' order; map each sequence to its rows' slots
    order = []
    for r in range(x.shape[0]):
        for t in range(x.shape[1]):
            if attn[r, t] and pos[r, t] == 0:
                n = next(
                    i
                    for i, s in enumerate(seqs)
                    if x[r, t : t + len(s.ids)].tolist() == s.ids and i not in order
                )
                order.append(n)
    offsets = np.cumsum([0] + lengths)
    ref = torch.cat([alone[offsets[i] : offsets[i + 1]] for i in order])
    torch.testing.assert_close(packed, ref, rtol=1e-4, atol=1e-5)
