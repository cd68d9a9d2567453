"""Quantization: every method against naive references and error bounds, exact save/reload (uniform and
heterogeneous), sub-modules and odd shapes, clear errors for unavailable methods, the CLI, and one real-model
check of perplexity."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ids, tiny_model
from torch import nn

from zipkd.errors import ZipkdError
from zipkd.manifest import content_hash
from zipkd.models.adapters import adapter_for
from zipkd.models.io import load_model, save_model
from zipkd.models.surgery import layer_shapes, remove_attention, slice_attention, slice_mlp, sync_config
from zipkd.quantize import api
from zipkd.quantize.api import (
    METHODS,
    QuantizeConfig,
    available_methods,
    linear_targets,
    quantize,
    quantize_model,
    quantized_modules,
    tensor_bytes,
)

ALL = list(METHODS)
# Relative error of the logits of the tiny random model vs float32 (golden runs here: int8 ≈ 0.01, 4-bit
# 0.14-0.20); bounds leave ~3x headroom.
MAX_REL_ERR = {"bnb-int8": 0.03, "quanto-int8": 0.03, "bnb-nf4": 0.4, "bnb-fp4": 0.5, "quanto-int4": 0.5}


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def fake_quant_blockwise(w: torch.Tensor, code: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Naive bitsandbytes 4-bit: flatten, blocks of 64 scaled by their absmax, nearest code value."""
    flat = w.reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat, flat.new_zeros(pad)]).view(-1, block)
    absmax = blocks.abs().amax(1, keepdim=True)
    idx = ((blocks / absmax).unsqueeze(-1) - code).abs().argmin(-1)
    return (code[idx] * absmax).reshape(-1)[: flat.numel()].view_as(w)


def fake_quant_rowwise_int8(w: torch.Tensor) -> torch.Tensor:
    """Naive symmetric int8 with one absmax scale per output row."""
    scale = w.abs().amax(1, keepdim=True) / 127
    return (w / scale).round().clamp(-127, 127) * scale


def naive_copy(model, fq) -> nn.Module:
    import copy

    ref = copy.deepcopy(model)
    for name in linear_targets(ref):
        lin = ref.get_submodule(name)
        lin.weight.data = fq(lin.weight.data)
    return ref


def test_methods_available_on_this_cpu():
    assert available_methods("cpu") == ALL  # both libraries are installed in the dev venv
    if not torch.cuda.is_available():
        assert available_methods("cuda") == []


def test_unavailable_method_names_the_available_ones(monkeypatch, tiny_llama):
    # A back end missing on this device (as bitsandbytes is on a bare GPU host):
    monkeypatch.setattr(
        api,
        "backend_problem",
        lambda backend, dev: "bitsandbytes is not installed" if backend == "bitsandbytes" else None,
    )
    with pytest.raises(ZipkdError) as err:
        quantize_model(tiny_llama, "nf4", "cpu")
    msg = str(err.value)
    assert "bnb-nf4 is not available on cpu" in msg and "not installed" in msg
    assert "quanto-int8, quanto-int4" in msg
    assert quantized_modules(tiny_llama) == []  # nothing touched


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's answer")
def test_cuda_method_on_cpu_machine_is_a_clear_error(tiny_llama):
    with pytest.raises(
        ZipkdError,
        match="not available on cuda: CUDA is not available on this machine; available on cuda: none",
    ):
        quantize_model(tiny_llama, "bnb-int8", "cuda")


def test_method_names():
    assert QuantizeConfig("nf4").method == "bnb-nf4" and QuantizeConfig("FP4").method == "bnb-fp4"
    with pytest.raises(ZipkdError, match="ambiguous; choose one of bnb-int8, quanto-int8"):
        QuantizeConfig("int8")
    with pytest.raises(ZipkdError, match="unknown quantization method 'int3'"):
        QuantizeConfig("int3")
    with pytest.raises(ZipkdError, match="unknown dtype"):
        QuantizeConfig("nf4", dtype="int8")


@pytest.mark.parametrize("method", ALL)
def test_quantize_model_error_and_size(method):
    model = tiny_model()
    x = ids()
    ref = logits(model, x)
    before = tensor_bytes(model)
    targets = linear_targets(model)
    quantize_model(model, method, "cpu")
    assert set(quantized_modules(model)) >= set(targets) and len(targets) == 3 * 7
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    err = rel_err(logits(model, x), ref)
    assert 0 < err < MAX_REL_ERR[method], err
    ratio = before / tensor_bytes(model)
    # 21 quantized linears hold 2/3 of this tiny model's weights; embeddings and lm_head stay float32.
    assert ratio > (1.6 if METHODS[method].bits == 8 else 2.0), ratio
    recipe = model.config.zipkd_quantization
    assert (
        recipe["method"] == method and recipe["modules"] == targets and recipe["compute_dtype"] == "float32"
    )


def _bf16_cpu_kernel() -> bool:
    from zipkd.quantize.bnb import import_bnb

    return bool(import_bnb().functional.has_avx512bf16())


def generic_bnb4(model) -> None:
    """Switch off bitsandbytes' fused bf16 CPU kernel (AVX512-BF16 machines) so 4-bit layers compute in float32."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


@pytest.mark.parametrize(
    "method,fq,tol",
    [
        ("bnb-nf4", "nf4", 1e-5),
        ("bnb-fp4", "fp4", 1e-5),
        ("quanto-int8", "int8", 1e-5),
        ("bnb-int8", "int8", 2e-2),  # LLM.int8() also quantizes activations row-wise; the naive copy does not
    ],
)
def test_matches_naive_fake_quantization(method, fq, tol):
    """The library's kernels compute what the format says: same logits as float32 weights rounded naively."""
    from zipkd.quantize.bnb import import_bnb

    model = tiny_model()
    x = ids()
    if fq == "int8":
        ref = naive_copy(model, fake_quant_rowwise_int8)
    else:
        code = import_bnb().functional.get_4bit_type(fq, device="cpu")
        ref = naive_copy(model, lambda w: fake_quant_blockwise(w, code))
    expected = logits(ref, x)
    quantize_model(model, method, "cpu")
    generic_bnb4(model)
    got = logits(model, x)
    assert rel_err(got, expected) < tol
    # and the naive copy is a real reference: far from float32 at 4 bits
    if fq in ("nf4", "fp4"):
        assert rel_err(expected, logits(tiny_model(), x)) > 10 * tol


@pytest.mark.skipif(not _bf16_cpu_kernel(), reason="bitsandbytes' fused 4-bit CPU kernel needs AVX512-BF16")
@pytest.mark.parametrize("shape", [(64, 96), (576, 1536), (1536, 576)])
def test_fused_bf16_cpu_kernel_close_to_format(shape):
    """The fused kernel casts activations and block scales to bf16: per layer within 1% of the exact format."""
    from zipkd.quantize.bnb import import_bnb, quantize_linear

    lin = nn.Linear(*shape).eval()
    wq = fake_quant_blockwise(lin.weight.data, import_bnb().functional.get_4bit_type("nf4", device="cpu"))
    q = quantize_linear(lin, "nf4", torch.device("cpu"))
    x = torch.randn(4, shape[0])
    with torch.no_grad():
        fused = q(x)
    assert getattr(q.weight.quant_state, "packing_format_for_cpu", False)
    assert rel_err(fused, nn.functional.linear(x, wq, lin.bias)) < 1e-2


@pytest.mark.parametrize("weights", ["nf4", "fp4"])
@pytest.mark.parametrize("in_features", [96, 160, 37])
def test_4bit_widths_not_multiple_of_block(weights, in_features):
    """bitsandbytes 0.50's native CPU dequantization is wrong for even widths that are not a multiple of 64
    (blocks straddle rows); zipkd's 4-bit layers must still compute the format exactly, for prompts and for
    single tokens, before and after saving."""
    from zipkd.quantize.bnb import import_bnb, load_linear, quantize_linear

    lin = nn.Linear(in_features, 64).eval()
    code = import_bnb().functional.get_4bit_type(weights, device="cpu")
    wq = fake_quant_blockwise(lin.weight.data, code)
    q = quantize_linear(lin, weights, torch.device("cpu"))
    back = load_linear(
        "l",
        {f"l.{k}": v for k, v in q.state_dict().items()},
        weights,
        in_features,
        64,
        torch.float32,
        torch.device("cpu"),
    )
    for x in (torch.randn(2, 7, in_features), torch.randn(1, 1, in_features)):
        expected = nn.functional.linear(x, wq, lin.bias)
        with torch.no_grad():
            assert rel_err(q(x), expected) < 1e-5 and rel_err(back(x), expected) < 1e-5


@pytest.mark.parametrize("method", ALL)
def test_inference_mode_and_deepcopy(method):
    """zipkd times and scores models under torch.inference_mode (quanto int4 fails there unguarded). bitsandbytes
    models also deep-copy (quanto's tensors cannot: copy before quantizing, as the latency profiler does)."""
    import copy

    model = quantize_model(tiny_model(), method, "cpu")
    x = ids()
    expected = logits(model, x)
    twins = [copy.deepcopy(model)] if METHODS[method].backend == "bitsandbytes" else []
    with torch.inference_mode():
        for m in [model, *twins]:
            assert torch.equal(m(x).logits, expected)


def test_eight_bit_beats_four_bit():
    x = ids()
    ref = logits(tiny_model(), x)
    errs = {m: rel_err(logits(quantize_model(tiny_model(), m, "cpu"), x), ref) for m in ALL}
    assert max(errs["bnb-int8"], errs["quanto-int8"]) < min(
        errs["bnb-nf4"], errs["bnb-fp4"], errs["quanto-int4"]
    )


@pytest.mark.parametrize("method", ALL)
def test_save_reload_exact_and_input_untouched(tmp_path, method):
    src = save_model(tiny_model(), None, tmp_path / "src", stage="test")
    digest = content_hash(src)
    x = ids()
    lm = load_model(src, tokenizer=False)
    res = quantize(lm, method, tmp_path / "q")
    expected = logits(lm.model, x)  # the in-memory quantized model
    back = load_model(res.out, tokenizer=False)
    assert torch.equal(logits(back.model, x), expected)
    assert content_hash(src) == digest
    manifest = json.loads((res.out / "zipkd.json").read_text())
    assert manifest["stage"] == "quantize" and manifest["quantization"]["method"] == method
    assert manifest["metrics"]["tensor_bytes_after"] < manifest["metrics"]["tensor_bytes_before"]
    assert res.disk_bytes < 0.7 * sum(f.stat().st_size for f in src.glob("*.safetensors"))
    with pytest.raises(ZipkdError, match="already exists"):
        quantize(src, method, res.out)
    with pytest.raises(ZipkdError, match="already quantized"):
        quantize(res.out, "bnb-nf4", tmp_path / "again")


@pytest.mark.parametrize("method", ["bnb-nf4", "bnb-int8"])
def test_bnb_folder_loads_with_stock_transformers(tmp_path, method):
    """Uniform bitsandbytes folders (4-bit: widths a multiple of 64) carry transformers' own quantization_config
    and layout."""
    from transformers import AutoModelForCausalLM

    lm = load_model(
        save_model(tiny_model(intermediate_size=128), None, tmp_path / "src", stage="t"), tokenizer=False
    )
    res = quantize(lm, method, tmp_path / "q")
    assert json.loads((res.out / "zipkd.json").read_text())["quantization"]["loads_with_stock_transformers"]
    stock = AutoModelForCausalLM.from_pretrained(res.out)
    x = ids()
    assert torch.equal(logits(stock, x), logits(lm.model, x))


@pytest.mark.parametrize("method", ["quanto-int8", "bnb-fp4"])
def test_other_folders_refuse_stock_transformers(tmp_path, method):
    """transformers would silently load quanto tensors into plain linears, and bitsandbytes' CPU kernels break
    on 4-bit widths that are not a multiple of 64 (this tiny model's MLP is 96 wide): the file name makes stock
    loading fail loudly instead; zipkd loads them."""
    from transformers import AutoModelForCausalLM

    res = quantize(
        load_model(save_model(tiny_model(), None, tmp_path / "src", stage="t"), tokenizer=False),
        method,
        tmp_path / "q",
    )
    assert [f.name for f in res.out.glob("*.safetensors")] == ["model.zipkd.safetensors"]
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(res.out)


def _heterogeneous():
    model = tiny_model("qwen2", tie_word_embeddings=True)  # q/k/v biases, tied lm_head (as SmolLM2)
    ad = adapter_for(model.config)
    layers = ad.layers(model)
    slice_attention(layers[0], ad, 16, 2, [1])
    slice_mlp(layers[1], ad, torch.arange(37))  # a width no kernel block divides
    remove_attention(layers[2], ad)
    sync_config(model)
    return model


@pytest.mark.parametrize("method", ALL)
def test_heterogeneous_model_round_trip(tmp_path, method):
    model = _heterogeneous()
    shapes = layer_shapes(model)
    x = ids()
    ref = logits(model, x)
    quantize_model(model, method, "cpu")
    got = logits(model, x)
    assert rel_err(got, ref) < MAX_REL_ERR[method]
    out = save_model(model, None, tmp_path / "q", stage="quantize")
    back = load_model(out, tokenizer=False).model
    assert layer_shapes(back) == shapes
    assert back.lm_head.weight is back.model.embed_tokens.weight and type(back.lm_head) is nn.Linear
    assert torch.equal(logits(back, x), got)


@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4", "quanto-int4"])
def test_single_layer_and_bare_linear(method):
    """`zipkd profile --quantization` times single decoder layers: any module, any nn.Linear shape."""
    model = _heterogeneous()
    layer = model.model.layers[1]  # MLP width 37
    h = torch.randn(1, 5, 64)
    pos = model.model.rotary_emb(h, torch.arange(5)[None])
    with torch.no_grad():
        ref = layer(h, position_embeddings=pos)
        quantize_model(layer, method, "cpu")
        got = layer(h, position_embeddings=pos)
    ref, got = (t[0] if isinstance(t, tuple) else t for t in (ref, got))
    assert len(quantized_modules(layer)) == 7
    assert rel_err(got, ref) < MAX_REL_ERR[method]
    lin = nn.Linear(37, 13)
    x = torch.randn(3, 37)
    with torch.no_grad():
        expected = lin(x)
        q = quantize_model(lin, method, "cpu")  # consumes `lin` (quanto releases its weights)
        assert q is not lin and q.in_features == 37 and q.out_features == 13
        assert rel_err(q(x), expected) < MAX_REL_ERR[method]


def test_bf16_reload(tmp_path):
    lm = load_model(save_model(tiny_model(), None, tmp_path / "src", stage="t"), tokenizer=False)
    x = ids()
    ref = logits(lm.model, x)
    for method in ("bnb-nf4", "quanto-int8"):
        res = quantize(load_model(tmp_path / "src", tokenizer=False), method, tmp_path / method)
        back = load_model(res.out, dtype="bfloat16", tokenizer=False).model
        assert next(back.model.norm.parameters()).dtype == torch.bfloat16
        assert rel_err(logits(back, x).float(), ref) < MAX_REL_ERR[method] + 0.05


def test_measure_records_ratio(tmp_path):
    from zipkd.latency.table import Regime

    lm = load_model(save_model(tiny_model(), None, tmp_path / "src", stage="t"), tokenizer=False)
    res = quantize(lm, "quanto-int8", tmp_path / "q", measure=Regime(seq_len=16), repeats=2)
    lat = json.loads((res.out / "zipkd.json").read_text())["metrics"]["latency"]
    assert lat["original_ms"] > 0 and lat["quantized_ms"] > 0
    assert lat["speedup"] == pytest.approx(lat["original_ms"] / lat["quantized_ms"])
    assert res.slower == (lat["speedup"] < 1)


def test_meta_and_already_quantized_refused(tiny_llama):
    quantize_model(tiny_llama, "bnb-int8", "cpu")
    with pytest.raises(ZipkdError, match="already quantized"):
        quantize_model(tiny_llama, "quanto-int8", "cpu")
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ZipkdError, match="meta device"):
        quantize_model(meta, "bnb-nf4", "cpu")
    with pytest.raises(ZipkdError, match="nothing to quantize"):
        quantize_model(nn.Sequential(nn.ReLU()), "bnb-nf4", "cpu")


def test_cli_quantize(tmp_path):
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from zipkd.cli import app
    from zipkd.models.io import embedded_folder

    runner = CliRunner()
    src = save_model(
        tiny_model(vocab_size=49152),
        AutoTokenizer.from_pretrained(embedded_folder()),
        tmp_path / "src",
        stage="t",
    )
    res = runner.invoke(
        app,
        [
            "quantize",
            str(src),
            "-m",
            "nf4",
            "-o",
            str(tmp_path / "q"),
            "--seq-len",
            "8",
            "--repeats",
            "1",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["method"] == "bnb-nf4" and data["quantized_linears"] == 21 and data["latency"]["speedup"] > 0
    assert load_model(tmp_path / "q").model.config.zipkd_quantization["method"] == "bnb-nf4"
    res = runner.invoke(app, ["quantize", str(src), "-m", "int8", "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "ambiguous" in res.output
    res = runner.invoke(app, ["quantize", str(src), "-m", "nf4", "-o", str(tmp_path / "q")])
    assert res.exit_code == 2 and "already exists" in res.output
    res = runner.invoke(app, ["quantize", "--list", "--json"])
    assert res.exit_code == 0 and [m["method"] for m in json.loads(res.stdout)["methods"]] == ALL


@pytest.mark.slow
def test_real_model_perplexity_and_reload(tmp_path):
    """SmolLM2-135M on 512 held-out tokens: int8 within 3% of float32 perplexity, nf4 within 60% (golden runs
    here on 1,024 tokens: fp32 51.7, quanto-int8 51.9, bnb-int8 52.4, bnb-nf4 67.3); the nf4 folder reloads with
    identical logits."""
    from zipkd.data.assets import heldout_text_path
    from zipkd.data.text import load_texts
    from zipkd.evaluate.perplexity import perplexity

    texts = load_texts(heldout_text_path())[:100]
    lm = load_model("smollm2-135m")

    def ppl(model):
        return perplexity(model, lm.tokenizer, texts, max_length=512, max_tokens=512)["perplexity"]

    base = ppl(lm.model)
    int8 = ppl(quantize_model(load_model("smollm2-135m", tokenizer=False).model, "quanto-int8", "cpu"))
    res = quantize(lm, "bnb-nf4", tmp_path / "nf4")
    nf4 = ppl(lm.model)
    assert base < int8 * 1.01 and int8 < base * 1.03, (base, int8)
    assert base < nf4 and nf4 < base * 1.6, (base, nf4)
    x = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(load_model(res.out).model, x), logits(lm.model, x))
