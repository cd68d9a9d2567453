"""GGUF export and the llama.cpp runtime: layer plans (pure), the rotary permutation against a naive loop, tiny
random models whose llama.cpp logits must equal torch's for every layer type the search can choose (and the
`deci` defect the stubs design around), the tokenizer check, latency tables measured in llama.cpp, and bad
input through the real CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from zipkd.errors import ZipkdError
from zipkd.export.gguf import STUB_FF, GGUFLayer, choose_arch, permute_rows, plan_layers

pytest.importorskip("llama_cpp")

# llama.cpp computes in f32 with its own kernels (and a different summation order; the KV cache is opened in
# f32 here, not llama.cpp's default f16): logits of these tiny models (|logit| up to ~25) agree with torch to
# about 1e-4; 2e-3 absolute leaves room and still catches a missing block or a wrong permutation, which move
# logits by whole units.
ATOL = 2e-3


def byte_tokenizer():
    """A byte-level BPE tokenizer with one merge (256 byte tokens, "Ġt", 2 specials): nearly one token per
    byte, a vocabulary llama.cpp's `gpt2` tokenizer model reproduces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    alphabet = ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["Ġt"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    vocab["<|im_start|>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "t")]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>", bos_token="<|im_start|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    return tok


def tiny(model_type: str = "llama", layers: int = 5, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    from zipkd.models.io import LoadedModel

    torch.manual_seed(seed)
    extra = {"attention_bias": True} if model_type == "llama" and seed == 7 else {}
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=260,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        **extra,
    )
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
            else:
                p.normal_(0, 1.0 if "embed" in name else 0.2)
    return LoadedModel(model, byte_tokenizer(), Path("tiny"), "tiny")


def every_layer_type(lm):
    """Attention removed in layer 0, MLP removed behind kept attention, both removed, varied KV groups/widths."""
    from zipkd.models.adapters import adapter_for
    from zipkd.models.surgery import remove_attention, remove_mlp, slice_attention, slice_mlp, sync_config

    m = lm.model
    ad = adapter_for(m.config)
    layers = ad.layers(m)
    remove_attention(layers[0], ad)
    remove_mlp(layers[1], ad)
    remove_attention(layers[2], ad)
    remove_mlp(layers[2], ad)
    slice_attention(layers[3], ad, 16, 2, [1])
    slice_mlp(layers[3], ad, torch.arange(10, 58))
    remove_attention(layers[4], ad)
    slice_mlp(layers[4], ad, torch.arange(32))
    sync_config(m)
    return lm


def export_f32(lm, path: Path):
    from zipkd.export.api import ExportConfig, export

    return export(lm, ExportConfig(quantization="f32"), path)


def engine_logits(path: Path, ids: list[int]) -> np.ndarray:
    from zipkd.runtimes.llamacpp import open_model

    with open_model(path, threads=2, n_ctx=128, logits_all=True, kv_f32=True) as em:
        em.eval(ids)
        return em.logits(0, len(ids))


def torch_logits(lm, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return lm.model(torch.tensor([ids])).logits[0].numpy()


IDS = [5, 77, 200, 13, 99, 42, 250, 3, 180, 64, 7, 120]


# ---------------------------------------------------------------- pure


def test_plan_layers_maps_every_layer_type():
    shapes = [
        {"kv_heads": 0, "intermediate": 96},
        {"kv_heads": 2, "intermediate": 0},
        {"kv_heads": 0, "intermediate": 0},
        {"kv_heads": 1, "intermediate": 48},
        {"kv_heads": 0, "intermediate": 32},
    ]
    plan = plan_layers(shapes, group_size=2, num_heads=4)
    assert plan == [
        GGUFLayer(2, 1, 96, "zero", "full", 0),  # layer 0 keeps llama.cpp's head geometry with a zero block
        GGUFLayer(4, 2, STUB_FF, "full", "stub", 1),  # deci would drop this attention without an MLP
        GGUFLayer(2, 1, 48, "full", "full", 3),  # the empty layer 2 is left out
        GGUFLayer(0, 0, 32, "none", "full", 4),
    ]
    assert choose_arch("llama", plan) == "deci"
    uniform = plan_layers([{"kv_heads": 2, "intermediate": 96}] * 3, 2, 4)
    assert choose_arch("llama", uniform) == "llama" and choose_arch("qwen2", uniform) == "qwen2"
    with pytest.raises(ZipkdError, match="uniform layout"):
        choose_arch("qwen3", plan)
    with pytest.raises(ZipkdError, match="no GGUF mapping"):
        choose_arch("gpt2", uniform)
    with pytest.raises(ZipkdError, match="nothing to export"):
        plan_layers([{"kv_heads": 0, "intermediate": 0}], 2, 4)


def test_permute_rows_matches_naive_interleave():
    n_head, d, cols = 3, 8, 5
    w = np.arange(n_head * d * cols, dtype=np.float32).reshape(n_head * d, cols)
    naive = np.empty_like(w)
    for h in range(n_head):
        for i in range(d // 2):  # llama.cpp pairs (x_i, x_{i+d/2}) of Hugging Face's halves as rows 2i, 2i+1
            naive[h * d + 2 * i] = w[h * d + i]
            naive[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    assert np.array_equal(permute_rows(w, n_head), naive)
    b = np.arange(n_head * d, dtype=np.float32)  # a bias vector is permuted like the rows it belongs to
    assert np.array_equal(permute_rows(b, n_head), naive[:, 0] // cols)


# ---------------------------------------------------------------- tiny models in llama.cpp


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_dense_and_heterogeneous_logits_equal_torch(tmp_path, model_type):
    from zipkd.runtimes.llamacpp import greedy, open_model

    dense = tiny(model_type)
    r = export_f32(dense, tmp_path / "dense.gguf")
    assert r.arch == {"llama": "llama", "qwen2": "qwen2"}[model_type]
    np.testing.assert_allclose(engine_logits(r.path, IDS), torch_logits(dense, IDS), atol=ATOL, rtol=0)

    het = every_layer_type(tiny(model_type))
    r = export_f32(het, tmp_path / "het.gguf")
    assert r.arch == "deci"
    assert {(lay["attn"], lay["mlp"]) for lay in r.layers} == {
        ("zero", "full"),
        ("full", "stub"),
        ("full", "full"),
        ("none", "full"),
    }
    want = torch_logits(het, IDS)
    np.testing.assert_allclose(engine_logits(r.path, IDS), want, atol=ATOL, rtol=0)
    with open_model(r.path, threads=2, n_ctx=128) as em:
        got = greedy(em, IDS, 16)
    with torch.no_grad():
        ref = het.model.generate(torch.tensor([IDS]), max_new_tokens=16, do_sample=False, min_new_tokens=16)
    assert got == ref[0, len(IDS) :].tolist()


def test_without_the_stub_deci_drops_the_attention(tmp_path, monkeypatch):
    """The llama.cpp defect the export designs around: a `deci` layer with attention but feed_forward_length 0
    loses its attention output. Written without zipkd's zero stub MLP, the logits are wrong."""
    import zipkd.export.gguf as G

    het = every_layer_type(tiny())
    good = export_f32(het, tmp_path / "stub.gguf")
    real_plan = G.plan_layers

    def no_stub(shapes, group_size, num_heads):
        return [
            GGUFLayer(lay.n_head, lay.n_head_kv, 0, lay.attn, "none", lay.source)
            if lay.mlp == "stub"
            else lay
            for lay in real_plan(shapes, group_size, num_heads)
        ]

    monkeypatch.setattr(G, "plan_layers", no_stub)
    bad = export_f32(het, tmp_path / "nostub.gguf")
    want = torch_logits(het, IDS)
    assert np.abs(engine_logits(good.path, IDS) - want).max() < ATOL
    assert np.abs(engine_logits(bad.path, IDS) - want).max() > 100 * ATOL


def test_quantized_export_and_manifest(tmp_path):
    from zipkd.export.api import ExportConfig, export, read_export_manifest
    from zipkd.runtimes.llamacpp import gguf_metadata

    lm = every_layer_type(tiny(layers=5))
    out = tmp_path / "q8.gguf"
    r = export(lm, ExportConfig(quantization="q8_0"), out)
    f32 = export_f32(lm, tmp_path / "f32.gguf")
    assert r.size_bytes < 0.6 * f32.size_bytes
    meta = gguf_metadata(out)
    assert meta["general.architecture"] == "deci"
    assert meta["deci.feed_forward_length"] == [128, STUB_FF, 48, 32]
    assert meta["deci.attention.head_count_kv"] == [1, 2, 1, 0]
    man = read_export_manifest(out)
    assert man["stage"] == "export" and man["config"]["quantization"] == "q8_0"
    # Q8_0 of these weights stays close: relative L2 error of the logits a few percent (8-bit rounding of
    # hidden-64 random weights); a wrong tensor layout or a lost block gives errors near 100%.
    got, want = engine_logits(out, IDS), torch_logits(lm, IDS)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05
    with pytest.raises(ZipkdError, match="already exists"):
        export(lm, ExportConfig(quantization="q8_0"), out)
    assert not list(tmp_path.glob(".*tmp*")), "no temporary files left behind"


def test_qwen3_heterogeneous_is_refused_but_uniform_exports(tmp_path):
    lm = every_layer_type(tiny("qwen3"))
    with pytest.raises(ZipkdError, match="uniform layout"):
        export_f32(lm, tmp_path / "het.gguf")
    assert not (tmp_path / "het.gguf").exists()
    dense = tiny("qwen3")
    r = export_f32(dense, tmp_path / "dense.gguf")
    assert r.arch == "qwen3"
    np.testing.assert_allclose(engine_logits(r.path, IDS), torch_logits(dense, IDS), atol=ATOL, rtol=0)


# ---------------------------------------------------------------- latency tables in llama.cpp


def test_llamacpp_table_is_exact_at_measured_shapes(tmp_path, monkeypatch):
    """Profiling in llama.cpp on a tiny model: the table has every level, reproduces the measured dense model, is
    cached under a llama.cpp fingerprint, and `validate` measures variants written as the export writes them."""
    from zipkd.latency.llamacpp import profile_llamacpp, validate_llamacpp
    from zipkd.latency.profile import table_cache_path, table_mismatch
    from zipkd.latency.table import Regime

    monkeypatch.setenv("ZIPKD_CACHE", str(tmp_path / "cache"))
    lm = tiny(layers=4)
    reg = Regime(
        regime="decode", runtime="llama.cpp", quantization="q8_0", threads=1, context=16, decode_tokens=4
    )
    tab = profile_llamacpp(lm, reg, repeats=2, widths=[32, 64, 96])
    assert tab.attention_levels == [0, 1, 2] and tab.mlp_levels == [0, 32, 64, 96, 128]
    assert tab.fingerprint["runtime"] == "llama.cpp" and tab.fingerprint["quantization"] == "q8_0"
    assert tab.fingerprint["threads"] == 1 and tab.fingerprint["llama_cpp"]
    if "clamped" not in tab.meta.get("warning", ""):  # on a busy machine noise can clamp an entry at 0
        assert tab.dense_ms() == pytest.approx(tab.measured_dense_ms, rel=1e-9)
    assert all(v >= 0 for v in [*tab.attention_ms.values(), *tab.mlp_ms.values()])
    assert table_mismatch(tab, lm.model.config, reg) == []
    other = Regime(regime="decode", runtime="llama.cpp", quantization="q4_k_m", threads=1, context=16)
    assert any("quantization" in p for p in table_mismatch(tab, lm.model.config, other))
    assert "llama.cpp-q8_0" in table_cache_path(lm.model.config, reg).name
    rep = validate_llamacpp(lm, tab, n=2, repeats=2)
    assert len(rep.variants) == 2 and all(v.measured_ms > 0 for v in rep.variants)


# ---------------------------------------------------------------- CLI and bad input


def _run(args: list[str]):
    from zipkd.cli import app

    return CliRunner().invoke(app, args)


def _one_line_error(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert lines and "error" in lines[0].lower(), result.output
    return result.output


def test_corrupt_and_truncated_gguf_are_refused(tmp_path):
    from zipkd.runtimes.llamacpp import check_gguf

    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ZipkdError, match="not a GGUF"):
        check_gguf(fake)
    good = export_f32(tiny(layers=2), tmp_path / "good.gguf").path
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ZipkdError, match="truncated|corrupt"):
        check_gguf(cut)
    out = _one_line_error(_run(["profile", str(cut), "--runtime", "llama.cpp"]))
    assert "cut.gguf" in out


def test_runtime_llamacpp_with_a_torch_quantization_is_refused():
    out = _one_line_error(_run(["profile", "--runtime", "llama.cpp", "--quantization", "bnb-int8"]))
    assert "GGUF type" in out and "q8_0" in out


def test_export_cli_refuses_bad_format_and_existing_output(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"GGUF")
    out = _one_line_error(_run(["export", "--format", "onnx", "-o", str(tmp_path / "y.gguf")]))
    assert "gguf" in out
    out = _one_line_error(_run(["export", "-o", str(tmp_path / "x.gguf")]))
    assert "already exists" in out
    out = _one_line_error(_run(["export", "-q", "q9_9", "-o", str(tmp_path / "z.gguf")]))
    assert "q8_0" in out


def test_llama_cpp_missing_names_make_install(tmp_path):
    """With llama-cpp-python not importable, `zipkd export` says how to install it, in one line."""
    code = (
        "import sys; sys.modules['llama_cpp'] = None\n"
        "from zipkd.cli import main\n"
        f"sys.argv = ['zipkd', 'export', '-o', {str(tmp_path / 'm.gguf')!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "make install" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.slow
def test_real_model_export_cli_q8_0(tmp_path):
    """The embedded model through `zipkd export`: a Q8_0 llama GGUF that tokenizes as Hugging Face does."""
    out = tmp_path / "smollm2-q8_0.gguf"
    result = _run(["export", "smollm2-135m", "-q", "q8_0", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["arch"] == "llama" and info["quantization"] == "q8_0"
    assert 100e6 < out.stat().st_size < 200e6


def test_export_cli_refuses_a_layout_without_gguf_mapping_before_loading(tmp_path):
    """A heterogeneous Qwen3 folder: refused from its config.json alone (no weights loaded), one line."""
    import time

    from zipkd.models.io import save_model

    lm = every_layer_type(tiny("qwen3"))
    folder = tmp_path / "qwen3-het"
    save_model(lm.model, lm.tokenizer, folder, "prune")
    t0 = time.perf_counter()
    out = _one_line_error(_run(["export", str(folder), "-o", str(tmp_path / "q.gguf")]))
    assert "uniform layout" in out and time.perf_counter() - t0 < 5
    assert not (tmp_path / "q.gguf").exists()
