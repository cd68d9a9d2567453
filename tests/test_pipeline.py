"""`zipkd run` end to end on the real embedded model with tiny budgets: every stage writes its folder and
manifest, a rerun skips unchanged stages, `--from` reruns from a stage, and an interrupted recovery resumes.

A synthetic latency table (with the real fingerprint) stands in for profiling, which `tests/test_latency*.py`
and the benchmark cover; timing has no place in a test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import kill_at_first_checkpoint
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
        regime=regime,
        fingerprint={**model_fingerprint(cfg), **device_fingerprint(regime)},
        rest_ms=40.0,
        attention_ms={k: 4.0 * k + (0.5 if k else 0.0) for k in range(4)},
        mlp_ms={w: 12.0 * w / 1536 + (0.5 if w else 0.0) for w in mlp_grid(1536)},
        num_layers=30,
    )
    table.save(path)
    return regime


def recipe(tmp_path, steps=4, export=False):
    table = tmp_path / "table.json"
    regime = synthetic_table(table)
    r = {
        "name": "test",
        "model": "smollm2-135m",
        "output": str(tmp_path / "run"),
        "seed": 0,
        "hardware": {"device": "cpu", "regime": "prefill", "batch": 1, "seq_len": regime.seq_len},
        "profile": {"table": str(table)},
        "prune": {"target_speedup": "1.5x", "samples": 4, "calib_len": 64},
        "recover": {
            "examples": 4,
            "steps": steps,
            "batch_size": 2,
            "max_new_tokens": 8,
            "max_seq_len": 64,
            "checkpoint_every": 2,
        },
        "quantize": False,
        "eval": {"tasks": ["arc_easy"], "limit": 8, "batch_size": 8, "perplexity": False, "speed_repeats": 1},
    }
    if export:
        r["export"] = {"quantization": "q8_0"}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def test_run_skip_and_from(tmp_path, monkeypatch):
    """Every stage, the export one included: the recovered model as a Q8_0 GGUF, scored in llama.cpp beside the
    dense GGUF at the same type. A rerun skips every stage; a changed library default for the data a stage reads
    (recover's text mix) reruns that stage and what follows it."""
    runner = CliRunner()
    path = recipe(tmp_path, export=True)
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output + res.stderr
    out = tmp_path / "run"
    for folder in ("1-profile", "2-prune", "3-recover", "6-eval"):
        manifest = out / folder / ("zipkd.json" if folder != "6-eval" else "report.json")
        assert manifest.is_file(), folder
    prune_manifest = json.loads((out / "2-prune" / "zipkd.json").read_text())
    assert prune_manifest["stage"] == "prune" and prune_manifest["seed"] == 0
    assert prune_manifest["metrics"]["predicted_speedup"] >= 1.5 - 1e-6
    report = json.loads((out / "6-eval" / "report.json").read_text())
    assert report["base"] is not None and report["models"][0]["measured_speedup"] > 0
    export_manifest = json.loads((out / "5-export" / "zipkd.json").read_text())
    assert export_manifest["stage"] == "export" and export_manifest["inputs"][0]["path"].endswith("3-recover")
    assert (out / "5-export" / "model.gguf").read_bytes()[:4] == b"GGUF"
    engine = json.loads((out / "6-eval" / "llama.cpp" / "report.json").read_text())
    assert engine["models"][0]["engine"]["quantization"] == "q8_0"
    assert engine["base"]["engine"]["quantization"] == "q8_0" and engine["models"][0]["measured_speedup"] > 0
    assert "the exported GGUF in llama.cpp" in " ".join(res.stdout.split())
    state = json.loads((out / "pipeline.json").read_text())
    assert all(state[s]["done"] for s in ("profile", "prune", "recover", "export", "eval"))
    pruned_mtime = (out / "2-prune" / "zipkd.json").stat().st_mtime

    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0
    assert res.stderr.count("skipped (unchanged)") == 5
    assert (out / "2-prune" / "zipkd.json").stat().st_mtime == pruned_mtime

    res = runner.invoke(app, ["run", str(path), "--from", "eval"])
    assert res.exit_code == 0
    assert res.stderr.count("skipped (unchanged)") == 4 and "eval: running" in res.stderr
    assert (out / "2-prune" / "zipkd.json").stat().st_mtime == pruned_mtime

    from zipkd.data.assets import calib_text_path

    monkeypatch.setattr("zipkd.recover.api.default_mix", lambda: [(calib_text_path(), 1.0)])
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output + res.stderr
    assert "prune: skipped (unchanged)" in res.stderr and "recover: running" in res.stderr
    assert res.stderr.count("skipped (unchanged)") == 2
    assert (out / "2-prune" / "zipkd.json").stat().st_mtime == pruned_mtime

    # another zipkd (a default that lives in code, e.g. a learning rate left None): changed recovery code reruns
    # recovery and what follows it, not pruning; changed code every stage reads reruns every stage
    from zipkd.pipeline import code_key

    monkeypatch.setattr(
        "zipkd.pipeline.code_key", lambda stage: "another recover" if stage == "recover" else code_key(stage)
    )
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output + res.stderr
    assert "prune: skipped (unchanged)" in res.stderr and "recover: running" in res.stderr
    assert res.stderr.count("skipped (unchanged)") == 2
    assert (out / "2-prune" / "zipkd.json").stat().st_mtime == pruned_mtime

    monkeypatch.setattr("zipkd.pipeline.code_key", lambda stage: "another zipkd")
    res = runner.invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output + res.stderr
    assert "skipped (unchanged)" not in res.stderr and "prune: running" in res.stderr


def test_code_key_follows_what_a_stage_runs(tmp_path):
    """A stage's code key covers its package and every part of zipkd it refers to (imports, lazy ones too, and
    module names a registry imports), plus the runners: an edit to evaluation code changes eval's key and not
    recovery's; an edit to the model loader both reach changes both; an edit to the runners changes every key."""
    import shutil

    import zipkd
    from zipkd.pipeline import STAGE_PACKAGES, code_key

    root = tmp_path / "zipkd"
    shutil.copytree(
        Path(zipkd.__file__).parent, root, ignore=shutil.ignore_patterns("__pycache__", "recipes")
    )

    def keys(version: int) -> dict[str, str]:
        copy = tmp_path / f"v{version}"  # a new folder per version: the key cache cannot hide an edit
        shutil.copytree(root, copy / "zipkd")
        return {stage: code_key(stage, copy / "zipkd") for stage in STAGE_PACKAGES}

    base = keys(0)
    assert len(set(base.values())) == len(base)  # no two stages read the same code
    assert keys(1) == base  # unchanged sources, another folder: the same keys
    with open(root / "evaluate" / "api.py", "a") as f:
        f.write("\n# an edit\n")
    edited = keys(2)
    assert edited["eval"] != base["eval"] and edited["recover"] == base["recover"]
    assert edited["prune"] == base["prune"]
    with open(root / "models" / "io.py", "a") as f:
        f.write("\n# an edit\n")
    again = keys(3)
    assert again["recover"] != edited["recover"] and again["prune"] != edited["prune"]
    with open(root / "pipeline.py", "a") as f:
        f.write("\n# an edit\n")
    last = keys(4)
    assert all(last[s] != again[s] for s in STAGE_PACKAGES)


def _weights(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    assert out, f"no weights in {folder}"
    return out


def _scores(report_path):
    report = json.loads(report_path.read_text())
    return [(m.get("stage"), m["quality"], m.get("perplexity")) for m in [report["base"], *report["models"]]]


def _temporaries(*folders):
    """Hidden temporaries (`.NAME.tmp-*`, `.NAME.old-*`, `.NAME.lock`) left anywhere under these folders."""
    return [
        p
        for f in folders
        for p in f.rglob(".*")
        if ".tmp-" in p.name or ".old-" in p.name or p.suffix == ".lock"
    ]


def test_run_killed_mid_recovery_resumes_and_matches_an_uninterrupted_run(tmp_path):
    """SIGKILL `zipkd run` once recovery has a checkpoint, and SIGTERM another run of it at the same point; the
    same command again skips profile and prune, resumes recovery, leaves no temporary behind, and ends with the
    weights and scores of an uninterrupted run of the same recipe and seed."""
    import os
    import signal
    import subprocess
    import sys

    import torch

    path = recipe(tmp_path, steps=8)
    ref = tmp_path / "ref"
    cmd = [sys.executable, "-m", "zipkd.cli", "run", str(path)]
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}
    uninterrupted = subprocess.run(
        [*cmd, "-o", str(ref)], env=env, capture_output=True, text=True, timeout=900
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]
    for sig, name, code in ((signal.SIGKILL, "killed", -signal.SIGKILL), (signal.SIGTERM, "terminated", 143)):
        out = tmp_path / name
        run = [*cmd, "-o", str(out)]
        work = out / ".3-recover.recover-work"  # beside the stage folder
        log = tmp_path / f"{name}.log"
        returncode = kill_at_first_checkpoint(run, env, work, log, timeout=900, sig=sig)
        assert returncode == code, f"run ended before it could be stopped: {log.read_text()[-2000:]}"
        state = json.loads((out / "pipeline.json").read_text())
        assert state["prune"]["done"] and not state["recover"]["done"] and not (out / "3-recover").exists()
        if sig == signal.SIGTERM:
            assert "terminated" in log.read_text() and "Traceback" not in log.read_text()

        rerun = subprocess.run(run, env=env, capture_output=True, text=True, timeout=900)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        assert "profile: skipped (unchanged)" in rerun.stderr and "prune: skipped (unchanged)" in rerun.stderr
        assert "recover: running" in rerun.stderr
        manifest = json.loads((out / "3-recover" / "zipkd.json").read_text())
        assert manifest["metrics"]["resumed_from_step"] >= 2 and manifest["metrics"]["steps"] == 8
        assert not work.exists() and not _temporaries(out), _temporaries(out)
        for stage in ("2-prune", "3-recover"):
            a, b = _weights(out / stage), _weights(ref / stage)
            assert a.keys() == b.keys(), stage
            assert all(torch.equal(a[k], b[k]) for k in a), f"{name}: {stage} weights differ"
        assert _scores(out / "6-eval" / "report.json") == _scores(ref / "6-eval" / "report.json")
    assert not _temporaries(tmp_path), _temporaries(tmp_path)
