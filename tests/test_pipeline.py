"""`zipkd run` end to end on the real embedded model with tiny budgets: every stage writes its folder and
manifest, a rerun skips unchanged stages, `--from` reruns from a stage, and an interrupted recovery resumes.

A synthetic latency table (with the real fingerprint) stands in for profiling, which `tests/test_latency*.py`
and the benchmark cover; timing has no place in a test."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from zipkd.cli import app

pytestmark = pytest.mark.slow


def synthetic_table(path):
    from zipkd.latency.profile import device_fingerprint, mlp_grid, model_fingerprint
    from zipkd.latency.table import LatencyTable, Regime
    from zipkd.models.io import load_model

    cfg = load_model("smollm2-135m", tokenizer=False).model.config
    regime = Regime(device="cpu", regime="prefill", batch=1, seq_len=64)
    table = LatencyTable(
        regime=regime, fingerprint={**model_fingerprint(cfg), **device_fingerprint(regime)}, rest_ms=40.0,
        attention_ms={k: 4.0 * k + (0.5 if k else 0.0) for k in range(4)},
        mlp_ms={w: 12.0 * w / 1536 + (0.5 if w else 0.0) for w in mlp_grid(1536)}, num_layers=30,
    )
    table.save(path)
    return regime


def recipe(tmp_path, steps=4):
    table = tmp_path / "table.json"
    regime = synthetic_table(table)
    r = {
        "name": "test", "model": "smollm2-135m", "output": str(tmp_path / "run"), "seed": 0,
        "hardware": {"device": "cpu", "regime": "prefill", "batch": 1, "seq_len": regime.seq_len},
        "profile": {"table": str(table)},
        "prune": {"target_speedup": "1.5x", "samples": 4, "calib_len": 64},
        "recover": {"examples": 4, "steps": steps, "batch_size": 2, "max_new_tokens": 8, "max_seq_len": 64,
                    "checkpoint_every": 2},
        "quantize": False,
        "eval": {"tasks": ["arc_easy"], "limit": 8, "batch_size": 8, "perplexity": False, "speed_repeats": 1},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def test_run_skip_and_from(tmp_path):
    runner = CliRunner()
    path = recipe(tmp_path)
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output + res.stderr
    out = tmp_path / "run"
    for folder in ("1-profile", "2-prune", "3-recover", "5-eval"):
        manifest = out / folder / ("zipkd.json" if folder != "5-eval" else "report.json")
        assert manifest.is_file(), folder
    prune_manifest = json.loads((out / "2-prune" / "zipkd.json").read_text())
    assert prune_manifest["stage"] == "prune" and prune_manifest["seed"] == 0
    assert prune_manifest["metrics"]["predicted_speedup"] >= 1.5 - 1e-6
    report = json.loads((out / "5-eval" / "report.json").read_text())
    assert report["base"] is not None and report["models"][0]["measured_speedup"] > 0
    state = json.loads((out / "pipeline.json").read_text())
    assert all(state[s]["done"] for s in ("profile", "prune", "recover", "eval"))
    pruned_mtime = (out / "2-prune" / "zipkd.json").stat().st_mtime

    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0
    assert res.stderr.count("skipped (unchanged)") == 4
    assert (out / "2-prune" / "zipkd.json").stat().st_mtime == pruned_mtime

    res = runner.invoke(app, ["run", str(path), "--from", "eval"])
    assert res.exit_code == 0
    assert res.stderr.count("skipped (unchanged)") == 3 and "eval: running" in res.stderr
    assert (out / "2-prune" / "zipkd.json").stat().st_mtime == pruned_mtime
