"""zipkd eval on the real embedded model (slow): the score equals the `lm_eval` command line's on the same task
file, model folder and limit; the gate passes the same model and fails a deliberately worse one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

LIMIT = 20
BATCH = 8


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """The dense embedded model's report on arc_easy (first 20 documents after the tasks' fixed shuffle)."""
    from zipkd.evaluate import EvalConfig, evaluate, write_report

    cfg = EvalConfig(
        tasks=["arc_easy"], limit=LIMIT, batch_size=BATCH, ppl_max_tokens=1024, speed=False, base=None
    )
    report = evaluate("smollm2-135m", cfg)
    folder = write_report(report, tmp_path_factory.mktemp("dense") / "report")
    return report, folder


def test_score_equals_lm_eval_command_line(dense, tmp_path):
    from zipkd.evaluate.harness import materialize_tasks, parse_results
    from zipkd.models.io import resolve_model

    report, _ = dense
    tasks = materialize_tasks(tmp_path / "tasks", ["arc_easy"])
    cmd = [
        str(Path(sys.executable).parent / "lm_eval"),
        "run",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={resolve_model('smollm2-135m')},dtype=float32",
        "--tasks",
        "zipkd_arc_easy",
        "--include_path",
        str(tasks),
        "--device",
        "cpu",
        "--batch_size",
        str(BATCH),
        "--limit",
        str(LIMIT),
        "--output_path",
        str(tmp_path / "out"),
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (result_file,) = (tmp_path / "out").rglob("results_*.json")
    cli = parse_results(json.loads(result_file.read_text()), ["arc_easy"])["arc_easy"]
    ours = report.models[0].quality["arc_easy"]
    assert cli.n == ours["n"] == LIMIT
    assert cli.metrics == ours["metrics"]  # the same numbers, not close ones
    assert cli.stderr["acc"] == ours["stderr"]
    assert ours["metrics"]["acc"] > 0.35  # the embedded model is well above chance (0.25) on ARC-Easy


def test_gate_passes_same_model_and_fails_worse_one(dense, tmp_path):
    from typer.testing import CliRunner

    from zipkd.cli import app
    from zipkd.models.io import load_model, save_model
    from zipkd.models.surgery import drop_layers, sync_config

    _, baseline = dense
    runner = CliRunner()
    same = runner.invoke(
        app,
        [
            "eval",
            "smollm2-135m",
            "--baseline",
            str(baseline),
            "--no-speed",
            "--no-base",
            "--max-drop",
            "0.02",
        ],
    )
    assert same.exit_code == 0, same.output
    assert "gate passed" in same.output

    lm = load_model("smollm2-135m")
    drop_layers(lm.model, list(range(1, 30, 2)))  # every other layer: a much worse model
    sync_config(lm.model)
    worse = save_model(lm.model, lm.tokenizer, tmp_path / "worse", stage="test", inputs={"model": lm.path})
    res = runner.invoke(
        app,
        ["eval", str(worse), "--baseline", str(baseline), "--no-speed", "--no-base", "--max-drop", "0.02"],
    )
    assert res.exit_code == 1, res.output
    out = " ".join(res.output.split())
    # 20 questions cannot prove a task drop (the paired test says so); the perplexity rise is unmistakable.
    assert "arc_easy acc" in out and "a true drop of" in out
    assert "regressed: worse: held-out perplexity" in out and "gate failed" in out
