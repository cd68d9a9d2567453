"""The prepared GPU scripts run end to end in their CPU smoke mode (tiny shapes), so a GPU session never spends
its minutes on a script that cannot run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _smoke(script: str, out: Path) -> dict:
    """Run `scripts/SCRIPT.py --smoke --out OUT`; its exit status must be 0; return its JSON result."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads((out / f"{script}.json").read_text())


def test_gpu_layout_smoke(tmp_path):
    res = _smoke("gpu_layout", tmp_path)
    assert res["ok"] and res["stage"] == "done"
    assert {"a_decode_eager", "b_prune_prefill", "b_prune_decode_eager", "c_layouts_decode_eager"} <= set(
        res["checks"]
    )
    uni = res["checks"]["c_layouts_decode_eager"]["uniform"]
    assert uni["layers"] >= 1 and min(uni["shape"]) >= 1


def test_gpu_recover_smoke(tmp_path):
    """The recovery GPU check on tiny shapes: both training paths (the earlier KD + autocast one and the current
    defaults with bf16 weights) run and report tokens/s, and the interrupted run resumes bit-identical."""
    res = _smoke("gpu_recover", tmp_path)
    assert res["resume"]["bit_identical"] and res["resume"]["resumed_from"] == 3
    for path in ("earlier", "current"):
        row = res["train"][path]
        assert row["steps"] >= 4 and row["tokens_per_s"] > 0
    assert res["train"]["current"]["config"]["bf16_weights"] is True
