"""SLERP merging: the formula against a geometric reference, whole-model merging, shape errors, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_recover_utils import make_chain, tiny_lm, tiny_tokenizer
from typer.testing import CliRunner

from zipkd.errors import ZipkdError
from zipkd.recover.merge import merge_models, slerp


@pytest.mark.parametrize("t", [0.0, 0.25, 0.5, 1.0])
def test_slerp_walks_the_great_circle(t):
    """Unit vectors at angle θ: the result is the unit vector at angle tθ in their plane."""
    theta = 1.2
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([math.cos(theta), math.sin(theta), 0.0])
    expected = torch.tensor([math.cos(t * theta), math.sin(t * theta), 0.0])
    torch.testing.assert_close(slerp(a, b, t), expected, rtol=1e-6, atol=1e-6)


def test_slerp_matches_formula_on_tensors():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, generator=g), 3 * torch.randn(4, 5, generator=g)
    cos = float((a.flatten() @ b.flatten()) / (a.norm() * b.norm()))
    th = math.acos(cos)
    t = 0.3
    ref = math.sin((1 - t) * th) / math.sin(th) * a + math.sin(t * th) / math.sin(th) * b
    torch.testing.assert_close(slerp(a, b, t), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slerp(a, 2 * a, 0.5), 1.5 * a)  # colinear: linear interpolation
    assert slerp(a.bfloat16(), b.bfloat16(), t).dtype == torch.bfloat16
    with pytest.raises(ValueError):
        slerp(a, b[:2], t)


def test_merge_models_tensor_by_tensor():
    a, b = tiny_lm(seed=0), tiny_lm(seed=1)
    ref_a = {k: v.clone() for k, v in a.state_dict().items()}
    ref_b = b.state_dict()
    merge_models(a, b, 0.4)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, slerp(ref_a[k], ref_b[k], 0.4))
    with pytest.raises(ZipkdError, match="must be in"):
        merge_models(a, b, 1.5)


def test_merge_refuses_other_shapes():
    with pytest.raises(ZipkdError, match="exists only in"):
        merge_models(tiny_lm(layers=3), tiny_lm(layers=2), 0.5)


def test_cli_merge(tmp_path):
    from zipkd.cli import app
    from zipkd.models.io import load_model, save_model

    tok = tiny_tokenizer()
    a = save_model(tiny_lm(seed=0), tok, tmp_path / "a", stage="recover")
    b = save_model(tiny_lm(seed=1), tok, tmp_path / "b", stage="recover")
    runner = CliRunner()
    res = runner.invoke(app, ["merge", str(a), str(b), "--slerp", "0.5", "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    merged = load_model(tmp_path / "m").model.state_dict()
    sa, sb = load_model(a).model.state_dict(), load_model(b).model.state_dict()
    k = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(merged[k], slerp(sa[k], sb[k], 0.5))
    manifest = json.loads((tmp_path / "m" / "zipkd.json").read_text())
    assert manifest["stage"] == "merge" and {i["role"] for i in manifest["inputs"]} == {"model", "model_b"}
    _, pruned = make_chain(tmp_path / "chain")
    res = runner.invoke(app, ["merge", str(a), str(pruned), "-o", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "different" in res.stderr and not (tmp_path / "bad").exists()
    res = runner.invoke(app, ["merge", str(a), str(b), "--slerp", "1.5", "-o", str(tmp_path / "bad")])
    assert res.exit_code == 2
