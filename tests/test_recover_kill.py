"""Kill test: `zipkd recover` killed with SIGKILL after its first checkpoint, rerun with the same command,
resumes from that checkpoint and ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import torch
from conftest import kill_at_first_checkpoint
from test_recover import TEXT, _weights
from test_recover_utils import make_chain, write_jsonl


def test_sigkill_then_rerun_resumes_with_identical_weights(tmp_path):
    _, pruned = make_chain(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", repeat=2)
    (tmp_path / "mix.txt").write_text(TEXT)
    opts = [
        "--data",
        str(data),
        "--mix-text",
        str(tmp_path / "mix.txt"),
        "--steps",
        "12",
        "--checkpoint-every",
        "3",
        "--batch-size",
        "2",
        "--max-seq-len",
        "96",
        "--max-new-tokens",
        "8",
        "--lr",
        "3e-3",
        "--json",
    ]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "zipkd.cli", "recover", str(pruned), "-o", str(out), *opts]
    # Passive OpenMP waits: on a shared CPU, spinning threads make tiny-model steps ~10x slower (same results).
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "ZIPKD_CACHE": str(tmp_path / "cache")}
    work = tmp_path / ".out.recover-work"

    log = tmp_path / "killed.log"
    returncode = kill_at_first_checkpoint(cmd, env, work, log, timeout=300)
    assert returncode == -signal.SIGKILL, f"run ended before it could be killed: {log.read_text()[-2000:]}"
    assert not out.exists() and [p.name for p in work.glob("ckpt-*")]

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    summary = json.loads(rerun.stdout[rerun.stdout.index("{") :])
    assert summary["resumed_from_step"] >= 3 and summary["steps"] == 12
    assert not work.exists()

    ref = subprocess.run(
        [*cmd[:6], str(tmp_path / "ref"), *opts], env=env, capture_output=True, text=True, timeout=300
    )  # uninterrupted, same command otherwise
    assert ref.returncode == 0, ref.stderr[-2000:]
    a, b = _weights(tmp_path / "ref"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
