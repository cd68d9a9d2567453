"""Bench for `zipkd run` / `make demo` (issue #8): the shipped demo recipe end to end, then the same recipe again
killed in the middle of recovery and rerun.

1. Run A: `zipkd run zipkd/recipes/demo.yaml -o A` as a child process, exactly what `make demo` runs, with a fresh
   zipkd cache holding only the embedded model and the offline data (what `make install` leaves on a fresh
   clone): no latency table, no teacher rewrites. Wall time (target ≤ 30 min) and the final report: measured
   speedup of the recovered model against the base (target ≥ 1.5x) and the quality it kept.
2. Run B: the same recipe into another folder, same cache (it reuses A's latency table and teacher rewrites, as a
   user's second run would), killed with SIGKILL once recovery has written a checkpoint; then the same command
   again. Targets: profile and prune are skipped (unchanged), recovery resumes from its checkpoint
   (`resumed_from_step` > 0), and B's pruned weights, recovered weights and evaluation scores (task accuracies,
   perplexity) are identical to A's — same recipe and seed, same numbers. Measured speed is a timing and is not
   compared.

Prints the headline last; exits 1 on a miss.

    .venv/bin/python scripts/bench_demo.py [--recipe zipkd/recipes/demo.yaml] [--keep DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from zipkd.paths import cache_dir

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 1800.0
MIN_SPEEDUP = 1.5


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fresh_cache(base: Path) -> Path:
    """A zipkd cache with the converted embedded model and the exported data only (links to the user's cache)."""
    src = cache_dir()
    cache = base / "cache"
    cache.mkdir(parents=True)
    for name in ("models", "data"):
        if not (src / name).is_dir():
            sys.exit(f"bench_demo: {src / name} is missing; run `make install` (it runs `zipkd setup`) first")
        (cache / name).symlink_to(src / name, target_is_directory=True)
    return cache


def zipkd_run(recipe: Path, out: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "zipkd.cli", "run", str(recipe), "-o", str(out)]
    with log.open("w") as sink:  # a file, not a pipe: a full pipe would stall the child
        return subprocess.Popen(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT)


def safetensors_equal(a: Path, b: Path) -> tuple[bool, str]:
    from safetensors.torch import load_file

    fa, fb = sorted(a.glob("*.safetensors")), sorted(b.glob("*.safetensors"))
    if not fa or [f.name for f in fa] != [f.name for f in fb]:
        return False, f"weight files differ: {[f.name for f in fa]} vs {[f.name for f in fb]}"
    for x, y in zip(fa, fb, strict=True):
        ta, tb = load_file(x), load_file(y)
        if ta.keys() != tb.keys():
            return False, f"{x.name}: different tensor names"
        for k in ta:
            if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape or not bool((ta[k] == tb[k]).all()):
                return False, f"{x.name}: tensor {k} differs"
    return True, f"{sum(len(load_file(f)) for f in fa)} tensors bit-identical"


def scores(report: dict) -> dict[str, dict]:
    """Quality numbers (not timings) of each model in a report, keyed by stage."""
    out = {}
    for label, m in [
        ("base", report.get("base")),
        *[(m.get("stage") or m["name"], m) for m in report["models"]],
    ]:
        if m is None:
            continue
        q = {t: v.get("score") for t, v in sorted(m.get("quality", {}).items())}
        ppl = (m.get("perplexity") or {}).get("perplexity")
        out[label] = {"quality": q, "perplexity": ppl}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "zipkd" / "recipes" / "demo.yaml")
    ap.add_argument(
        "--keep", type=Path, default=None, help="keep the runs' folders here (default: a temp folder)"
    )
    ap.add_argument("--no-kill", action="store_true", help="run A only")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    base = args.keep or Path(tempfile.mkdtemp(prefix="zipkd-bench-demo-"))
    base.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "ZIPKD_CACHE": str(fresh_cache(base))}
    res: dict = {"recipe": str(args.recipe), "folder": str(base), "misses": []}

    # ---- run A: the demo, from an empty table/rewrite cache
    a = base / "A"
    _log(f"run A: zipkd run {args.recipe} -o {a}")
    t0 = time.perf_counter()
    proc = zipkd_run(args.recipe, a, env, base / "A.log")
    rc = proc.wait()
    wall_a = time.perf_counter() - t0
    print((base / "A.log").read_text()[-6000:])
    if rc != 0:
        print(f"bench_demo: run A failed (exit {rc}); log {base / 'A.log'}", file=sys.stderr)
        return 1
    state = json.loads((a / "pipeline.json").read_text())
    report_a = json.loads((a / "6-eval" / "report.json").read_text())
    rec = next(m for m in report_a["models"] if m.get("stage") == "recover")
    res["A"] = {
        "wall_s": round(wall_a, 1),
        "stage_seconds": {s: state[s].get("seconds") for s in state},
        "recovered_speedup": rec["measured_speedup"],
        "recovered_predicted": rec.get("predicted_speedup"),
        "retention": rec.get("mean_retention"),
        "scores": scores(report_a),
    }
    _log(f"run A: {wall_a:.0f} s, recovered model measured {rec['measured_speedup']:.2f}x")
    if wall_a > BUDGET_S:
        res["misses"].append(f"demo took {wall_a:.0f} s > {BUDGET_S:.0f} s")
    if rec["measured_speedup"] < MIN_SPEEDUP:
        res["misses"].append(f"measured speedup {rec['measured_speedup']:.2f}x < {MIN_SPEEDUP}x")

    if not args.no_kill:
        # ---- run B: same recipe, SIGKILL once recovery has a checkpoint, then the same command again
        b = base / "B"
        work = b / ".3-recover.recover-work"
        _log(f"run B: zipkd run {args.recipe} -o {b}, killed after the first recovery checkpoint")
        proc = zipkd_run(args.recipe, b, env, base / "B-killed.log")
        while not list(work.glob("ckpt-*")) and proc.poll() is None:
            time.sleep(0.05)
        killed = proc.poll() is None
        if killed:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpts = sorted(p.name for p in work.glob("ckpt-*"))
        state_b = json.loads((b / "pipeline.json").read_text())
        res["B_killed"] = {
            "killed": killed,
            "checkpoints": ckpts,
            "done": {s: v.get("done") for s, v in state_b.items()},
        }
        _log(f"run B killed={killed}, checkpoints {ckpts}; rerunning")
        t0 = time.perf_counter()
        proc = zipkd_run(args.recipe, b, env, base / "B.log")
        rc = proc.wait()
        wall_b = time.perf_counter() - t0
        log_b = (base / "B.log").read_text()
        if rc != 0:
            print(log_b[-4000:])
            print(f"bench_demo: rerun of B failed (exit {rc})", file=sys.stderr)
            return 1
        manifest = json.loads((b / "3-recover" / "zipkd.json").read_text())
        resumed = manifest.get("metrics", {}).get("resumed_from_step")
        skipped = [s for s in ("profile", "prune") if f"{s}: skipped (unchanged)" in log_b]
        same_pruned = safetensors_equal(a / "2-prune", b / "2-prune")
        same_recovered = safetensors_equal(a / "3-recover", b / "3-recover")
        scores_b = scores(json.loads((b / "6-eval" / "report.json").read_text()))
        same_scores = scores_b == res["A"]["scores"]
        res["B"] = {
            "rerun_wall_s": round(wall_b, 1),
            "skipped": skipped,
            "resumed_from_step": resumed,
            "pruned_identical": same_pruned,
            "recovered_identical": same_recovered,
            "scores_identical": same_scores,
            "scores": scores_b,
        }
        if not killed or not ckpts:
            res["misses"].append("run B finished before it could be killed mid-recovery")
        if skipped != ["profile", "prune"]:
            res["misses"].append(f"the rerun skipped only {skipped}, not profile and prune")
        if not resumed:
            res["misses"].append("the rerun did not resume recovery from a checkpoint")
        for what, (ok, why) in (("pruned", same_pruned), ("recovered", same_recovered)):
            if not ok:
                res["misses"].append(f"{what} weights differ between A and B: {why}")
        if not same_scores:
            res["misses"].append("evaluation scores differ between A and B")

    if args.json:
        args.json.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    sc = res["A"]["scores"]
    print(
        f"demo: {res['A']['wall_s'] / 60:.1f} min (target ≤ {BUDGET_S / 60:.0f}), recovered model measured "
        f"{res['A']['recovered_speedup']:.2f}x (target ≥ {MIN_SPEEDUP}x), predicted "
        f"{res['A']['recovered_predicted']:.2f}x, mean retention {res['A']['retention']:.1%}; "
        f"scores base {sc.get('base')} recovered {sc.get('recover')}"
    )
    if "B" in res:
        bb = res["B"]
        print(
            f"kill mid-recovery: skipped {bb['skipped']}, resumed from step {bb['resumed_from_step']}; "
            f"A vs B pruned identical={bb['pruned_identical'][0]}, recovered identical="
            f"{bb['recovered_identical'][0]}, scores identical={bb['scores_identical']}"
        )
    print("RESULT: " + ("PASS" if not res["misses"] else "MISS: " + "; ".join(res["misses"])))
    return 1 if res["misses"] else 0


if __name__ == "__main__":
    sys.exit(main())
