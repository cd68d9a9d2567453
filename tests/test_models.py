"""Model I/O: round trips (uniform and heterogeneous), surgery correctness, safe outputs."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ids, tiny_model

from zipkd.errors import ZipkdError
from zipkd.models.adapters import adapter_for
from zipkd.models.io import load_model, save_model
from zipkd.models.surgery import (
    LayerShape,
    drop_layers,
    layer_shapes,
    remove_attention,
    remove_mlp,
    slice_attention,
    slice_mlp,
    sync_config,
)


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_round_trip_exact(tmp_path, arch):
    model = tiny_model(arch)
    x = ids()
    out = save_model(model, None, tmp_path / "m", stage="test")
    back = load_model(out, tokenizer=False)
    assert torch.equal(logits(model, x), logits(back.model, x))
    manifest = json.loads((out / "zipkd.json").read_text())
    assert manifest["stage"] == "test" and "torch" in manifest["versions"] and "cpu" in manifest["hardware"]


def _reference_sliced_attention(model, layer_idx, keep_groups, x):
    """Naive reference: zero the removed heads' o_proj columns in a copy (same function as slicing)."""
    import copy

    ref = copy.deepcopy(model)
    attn = ref.model.layers[layer_idx].self_attn
    cfg = model.config
    g = cfg.num_attention_heads // cfg.num_key_value_heads
    for kv in range(cfg.num_key_value_heads):
        if kv not in keep_groups:
            for h in range(kv * g, (kv + 1) * g):
                attn.o_proj.weight.data[:, h * cfg.head_dim : (h + 1) * cfg.head_dim] = 0
    return logits(ref, x)


def test_slice_attention_matches_zeroed_heads():
    model = tiny_model("qwen2")  # q/k/v biases
    x = ids()
    expected = _reference_sliced_attention(model, 1, [1], x)
    ad = adapter_for(model.config)
    slice_attention(model.model.layers[1], ad, 16, 2, [1])
    sync_config(model)
    torch.testing.assert_close(logits(model, x), expected, rtol=1e-5, atol=1e-5)


def test_slice_mlp_matches_zeroed_channels():
    model = tiny_model("llama")
    x = ids()
    keep = list(range(0, 96, 2))
    import copy

    ref = copy.deepcopy(model)
    drop = [c for c in range(96) if c not in keep]
    ref.model.layers[0].mlp.down_proj.weight.data[:, drop] = 0
    slice_mlp(model.model.layers[0], adapter_for(model.config), keep)
    sync_config(model)
    torch.testing.assert_close(logits(model, x), logits(ref, x), rtol=1e-5, atol=1e-5)
    assert layer_shapes(model)[0] == LayerShape(2, 48)


def _heterogeneous(arch: str):
    model = tiny_model(arch, num_hidden_layers=5)
    ad = adapter_for(model.config)
    layers = model.model.layers
    slice_attention(layers[0], ad, 16, 2, [0])
    slice_mlp(layers[1], ad, list(range(40)))
    remove_attention(layers[2], ad)
    remove_mlp(layers[3], ad)
    drop_layers(model, [4])
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_heterogeneous_round_trip(tmp_path, arch):
    model = _heterogeneous(arch)
    assert [(s.kv_heads, s.intermediate) for s in layer_shapes(model)] == [(1, 96), (2, 40), (0, 96), (2, 0)]
    assert model.config.num_hidden_layers == 4
    x = ids()
    out = save_model(model, None, tmp_path / "het", stage="test")
    back = load_model(out, tokenizer=False)
    assert torch.equal(logits(model, x), logits(back.model, x))
    assert layer_shapes(back.model) == layer_shapes(model)
    # Generation with a KV cache works (compact layer_idx) and matches the in-memory model.
    prompt = ids(1, 6)
    a = model.generate(prompt, max_new_tokens=5, do_sample=False)
    b = back.model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(a, b)


def test_cached_generation_matches_full_forward():
    """KV-cached greedy decoding of a model whose first layer has no attention equals recomputation."""
    model = tiny_model("llama", num_hidden_layers=3)
    remove_attention(model.model.layers[0], adapter_for(model.config))
    sync_config(model)
    prompt = ids(1, 5)
    out = model.generate(prompt, max_new_tokens=4, do_sample=False)
    seq = prompt
    for _ in range(4):
        nxt = logits(model, seq)[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_uniform_pruned_loads_with_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    ad = adapter_for(model.config)
    for layer in model.model.layers:
        slice_attention(layer, ad, 16, 2, [1])
        slice_mlp(layer, ad, list(range(64)))
    drop_layers(model, [2])
    out = save_model(model, None, tmp_path / "u", stage="test")
    plain = AutoModelForCausalLM.from_pretrained(out)
    x = ids()
    assert torch.equal(logits(model, x), logits(plain, x))


def test_existing_output_needs_force(tmp_path):
    model = tiny_model()
    out = save_model(model, None, tmp_path / "m", stage="a")
    with pytest.raises(ZipkdError, match="--force"):
        save_model(model, None, out, stage="b")
    save_model(model, None, out, stage="b", force=True)
    assert json.loads((out / "zipkd.json").read_text())["stage"] == "b"


def test_output_cannot_be_its_own_input(tmp_path):
    model = tiny_model()
    out = save_model(model, None, tmp_path / "m", stage="a")
    with pytest.raises(ZipkdError, match="overwrite the input"):
        save_model(model, None, out, stage="b", inputs={"model": out}, force=True)


def test_interrupted_save_leaves_nothing(tmp_path, monkeypatch):
    model = tiny_model()

    def boom(*a, **k):
        (a[0] / "partial.safetensors").write_bytes(b"x")
        raise KeyboardInterrupt

    monkeypatch.setattr(model, "save_pretrained", boom)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, None, tmp_path / "m", stage="a")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_forced_save_keeps_old_output(tmp_path, monkeypatch):
    model = tiny_model()
    out = save_model(model, None, tmp_path / "m", stage="old")
    monkeypatch.setattr(model, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk")))
    with pytest.raises(RuntimeError):
        save_model(model, None, out, stage="new", force=True)
    assert json.loads((out / "zipkd.json").read_text())["stage"] == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_corrupt_safetensors(tmp_path):
    out = save_model(tiny_model(), None, tmp_path / "m", stage="a")
    f = next(out.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ZipkdError, match="corrupt weights"):
        load_model(out, tokenizer=False)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ZipkdError, match="unsupported architecture 'gpt2'"):
        load_model(tmp_path, tokenizer=False)


def test_pickled_weights_refused(tmp_path):
    out = save_model(tiny_model(), None, tmp_path / "m", stage="a")
    for f in out.glob("*.safetensors"):
        f.rename(f.with_suffix(".bin"))
    with pytest.raises(ZipkdError, match="safetensors only"):
        load_model(out, tokenizer=False)


def test_no_unsafe_unpickling_in_source():
    """Every torch.load in zipkd passes weights_only=True; nothing uses pickle directly."""
    from pathlib import Path

    import zipkd

    root = Path(zipkd.__file__).parent
    for f in root.rglob("*.py"):
        text = f.read_text()
        for line in text.splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{f}: {line.strip()}"
        assert "import pickle" not in text and "trust_remote_code=True" not in text, f


@pytest.mark.slow
def test_real_model_round_trip(tmp_path, real_model):
    x = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    out = save_model(
        real_model.model,
        real_model.tokenizer,
        tmp_path / "real",
        stage="test",
        inputs={"model": real_model.path},
    )
    back = load_model(out)
    assert torch.equal(logits(real_model.model, x), logits(back.model, x))
    assert back.tokenizer("hello world").input_ids == real_model.tokenizer("hello world").input_ids
    assert sum(p.numel() for p in back.model.parameters()) == 134_515_008
    inputs = json.loads((out / "zipkd.json").read_text())["inputs"]
    assert inputs[0]["role"] == "model" and len(inputs[0]["sha256"]) == 64


@pytest.mark.slow
def test_real_model_heterogeneous_round_trip(tmp_path, real_model):
    import copy

    model = copy.deepcopy(real_model.model)
    ad = adapter_for(model.config)
    for i, layer in enumerate(model.model.layers):
        if i % 3 == 0:
            slice_attention(layer, ad, 64, 3, [0, 2])
        if i % 4 == 1:
            slice_mlp(layer, ad, list(range(0, 1536, 2)))
    drop_layers(model, [5, 17])
    x = torch.tensor([[1, 504, 3458, 282, 4649, 314]])
    out = save_model(model, real_model.tokenizer, tmp_path / "het", stage="test")
    back = load_model(out)
    assert torch.equal(logits(model, x), logits(back.model, x))
    assert back.model.config.num_hidden_layers == 28
