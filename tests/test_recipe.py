"""Recipes: shipped ones validate; a recipe with several mistakes reports all of them, with lines."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import zipkd
from zipkd.cli import app
from zipkd.errors import ZipkdError
from zipkd.recipe import load_recipe, parse_recipe

RECIPES = sorted((Path(zipkd.__file__).parent / "recipes").glob("*.yaml"))


def test_recipes_are_shipped():
    assert {p.stem for p in RECIPES} >= {"demo"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_validates(path):
    r = load_recipe(path)
    assert r.enabled("prune") and r.enabled("eval")


def test_three_mistakes_reported_together(tmp_path):
    text = "model: smollm2-135m\noutput: out\nprune:\n  target_speedup: 0.5x\n  samples: many\neval:\n  limt: 5\n"
    with pytest.raises(ZipkdError) as e:
        parse_recipe(text, source=tmp_path / "r.yaml")
    msg = str(e.value)
    assert msg.startswith("3 problem(s)")
    assert "r.yaml:4: prune.target_speedup" in msg
    assert "r.yaml:5: prune.samples" in msg
    assert "r.yaml:7: eval.limt: unknown key" in msg


def test_missing_output_and_bad_yaml(tmp_path):
    with pytest.raises(ZipkdError, match="output: missing"):
        parse_recipe("model: smollm2-135m\n")
    with pytest.raises(ZipkdError, match=":2: not valid YAML"):
        parse_recipe("model: a\n  - b: [\n", source=Path("x.yaml"))


def test_recover_precision_key():
    assert parse_recipe("output: o\nrecover: {}\n").sections["recover"]["precision"] == "auto"
    assert parse_recipe("output: o\nrecover: {precision: bf16}\n").sections["recover"]["precision"] == "bf16"
    with pytest.raises(ZipkdError, match="recover.precision: must be auto, fp32 or bf16"):
        parse_recipe("output: o\nrecover: {precision: fp16}\n")


def test_disabled_stages():
    r = parse_recipe("output: o\nrecover: false\nquantize: {method: null}\n")
    assert not r.enabled("recover") and not r.enabled("quantize") and r.enabled("prune")


def test_cli_reports_all_problems_before_running(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output: out\nhardware:\n  batch: 0\n  device: tpu\nseed: x\n")
    res = CliRunner().invoke(app, ["run", str(bad)])
    assert res.exit_code == 2
    assert "3 problem(s)" in res.stderr and "bad.yaml:3" in res.stderr and "bad.yaml:4" in res.stderr
    assert "Traceback" not in res.output
    assert not (tmp_path / "out").exists()  # nothing ran
