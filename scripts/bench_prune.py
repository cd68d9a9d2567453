"""Bench: ZipLM-style pruning of the embedded SmolLM2-135M on this CPU (prefill 1×512, float32), targets 1.5x and 2x,
against the baselines run through the same code path (uniform magnitude, ShortGPT, Wanda-sp).

1. `zipkd prune -t 2x` as a child process: wall time and peak RSS (targets ≤ 300 s, ≤ 4 GB).
2. Each method prunes the family 1.5x,2x in-process from one database (same table, calibration, seed). The 2x
   zipkd weights are compared with step 1's output (same seed → bit-identical).
3. Every model: measured speedup (end to end, each pruned model timed alternately with the dense one,
   `zipkd.latency.measure.compare_ms`), held-out perplexity (LAMBADA passages, never calibration text) and
   ARC-Easy accuracy on a fixed subset (lm-eval `simple_evaluate` on zipkd's local task).

`--ablation` instead measures the design choices on the *development* text (`dev.txt`: a fifth of the CoQA
stories, never calibrated on, not evaluation text): errors weighted by the loss
Fisher or plain squared output errors, and the sequential re-fit versus no weight update.
`--calibration-ablation` compares calibration texts on the development text: BoolQ passages alone vs the
export's whole calibration text (BoolQ passages + CoQA stories), for zipkd and Wanda-sp.

Targets: zipkd has the lowest perplexity at each target; its measured speedup is within ±10% of the target;
the 2x run fits the time and memory budget; same seed → identical weights. Headline figures are printed
last; exit 1 on a miss.

    .venv/bin/python scripts/bench_prune.py [--samples 32] [--arc 100] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning (see bench_latency_prediction.py: on a
# CPU shared with other jobs, spinning threads make timings collapse). The thread count stays at the default.
if "--omp-active" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TARGETS = (1.5, 2.0)
METHODS = ("zipkd", "wanda-sp", "shortgpt", "magnitude")
BUDGET_S = 300.0
BUDGET_RSS_GB = 4.0
SPEED_TOL = 0.10


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def timed_cli_prune(args, out: Path) -> dict:
    """`zipkd prune` 2x in a child process; wall time and the child's peak RSS."""
    cmd = [
        sys.executable,
        "-m",
        "zipkd.cli",
        "prune",
        args.model,
        "-t",
        "2x",
        "-o",
        str(out),
        "--samples",
        str(args.samples),
        "--calib-len",
        str(args.calib_len),
        "--seed",
        str(args.seed),
        "--fisher-samples",
        str(args.fisher_samples),
        "--json",
    ]
    if args.table:
        cmd += ["--table", args.table]
    t0 = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path.cwd())}, check=False
    )
    wall = time.perf_counter() - t0
    rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9  # Linux: KiB
    if proc.returncode != 0:
        raise SystemExit(f"zipkd prune failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return {
        "wall_s": wall,
        "peak_rss_gb": rss_gb,
        "cmd": " ".join(cmd[1:]),
        "stdout": json.loads(proc.stdout),
    }


def arc_accuracy(model, tokenizer, limit: int) -> float | None:
    if limit <= 0:
        return None
    from zipkd.evaluate.harness import run_tasks

    res = run_tasks(model, tokenizer, ["arc_easy"], limit=limit, batch_size=8, max_length=512)
    return res["arc_easy"].metrics.get("acc_norm", res["arc_easy"].score)


def bench_regime():
    """Where speed is measured and targeted: CPU prefill, batch 1, 512 tokens, float32."""
    from zipkd.latency.table import Regime

    return Regime(device="cpu", regime="prefill", batch=1, seq_len=512, dtype="float32")


def bench_config(args, regime, **overrides):
    """The bench's PruneConfig: calibration size, seed and Fisher sequences from the command line."""
    from zipkd.prune import PruneConfig

    base = dict(
        samples=args.samples,
        calib_len=args.calib_len,
        seed=args.seed,
        regime=regime,
        fisher_samples=args.fisher_samples,
    )
    return PruneConfig(**{**base, **overrides})


def dev_setup(args):
    """Model, CPU prefill regime and latency table, calibration texts and a dev.txt perplexity function, for
    the ablations (scored on the development text only)."""
    from zipkd.data.assets import calib_text_path, dev_text_path
    from zipkd.data.text import load_texts
    from zipkd.evaluate.perplexity import perplexity
    from zipkd.models.io import load_model
    from zipkd.prune import PruneConfig
    from zipkd.prune.api import latency_table

    regime = bench_regime()
    lm = load_model(args.model)
    table = latency_table(lm, PruneConfig(regime=regime, table=args.table))
    dev = load_texts(dev_text_path())

    def ppl(model) -> float:
        return perplexity(model, lm.tokenizer, dev, max_length=512, max_tokens=args.ppl_tokens)["perplexity"]

    return lm, regime, table, load_texts(calib_text_path()), ppl


def ablation(args) -> int:
    """Design ablation on the development split (see the module docstring)."""
    from zipkd.prune.api import build
    from zipkd.prune.driver import apply_choice
    from zipkd.prune.search import select

    lm, regime, table, calib, ppl = dev_setup(args)
    dense = ppl(lm.model)
    rows = [("dense", "-", "-", dense, dense)]
    _log(f"dense dev ppl {dense:.2f}")
    for fisher in (args.fisher_samples, 0):
        config = bench_config(args, regime, fisher_samples=fisher)
        db, first = build(lm, config, table, calib)
        for refit in ("sequential", "none"):
            vals = []
            for t in TARGETS:
                shapes = select(db, table, t).shapes
                model = apply_choice(
                    lm.model, db, shapes, first.clone() if refit == "sequential" else None, refit, config.damp
                )
                vals.append(ppl(model))
                _log(f"fisher {fisher} refit {refit} {t}x: dev ppl {vals[-1]:.2f}")
            rows.append(
                (f"fisher={fisher}", "sequential" if refit == "sequential" else "no update", "", *vals)
            )
    print(
        f"\nAblation, SmolLM2-135M, development text (dev.txt), {args.ppl_tokens} tokens, "
        f"calibration {args.samples}x{args.calib_len}"
    )
    print(f"{'errors':<12} {'weights':<12} {'1.5x ppl':>9} {'2x ppl':>9}")
    for name, refit, _, a, b in rows:
        print(f"{name:<12} {refit:<12} {a:>9.2f} {b:>9.2f}")
    return 0


def calibration_ablation(args) -> int:
    """Which calibration text? BoolQ passages alone vs the export's whole calibration text (BoolQ passages +
    CoQA stories), for zipkd and Wanda-sp, scored on the development text (dev.txt) only."""
    import json as _json

    from zipkd.data.assets import calib_text_path
    from zipkd.prune import prune

    lm, regime, table, texts, ppl = dev_setup(args)
    info = _json.loads((calib_text_path().parent / "datasets.json").read_text())
    sources = {"BoolQ passages": texts[: info["counts"]["calib_passages"]], "BoolQ + CoQA stories": texts}

    rows = []
    for name, calib in sources.items():
        for method in ("zipkd", "wanda-sp"):
            config = bench_config(args, regime, target_speedup=TARGETS, method=method)
            vals = [ppl(r.model) for r in prune(lm, config, calib_texts=calib, table=table)]
            rows.append((name, method, *vals))
            _log(f"{name} {method}: dev ppl {vals}")
    print(
        f"\nCalibration ablation, SmolLM2-135M, development text (dev.txt), {args.ppl_tokens} tokens, "
        f"calibration {args.samples}x{args.calib_len}; dense {ppl(lm.model):.2f}"
    )
    print(f"{'calibration':<22} {'method':<9} {'1.5x ppl':>9} {'2x ppl':>9}")
    for name, method, a, b in rows:
        print(f"{name:<22} {method:<9} {a:>9.2f} {b:>9.2f}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--table", default=None, help="latency table file (default: cached or profiled now)")
    ap.add_argument("--ppl-tokens", type=int, default=16384)
    ap.add_argument("--arc", type=int, default=100, help="ARC-Easy questions (0 = skip)")
    ap.add_argument("--repeats", type=int, default=9, help="timed rounds per speed comparison")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--skip-cli", action="store_true", help="skip the timed child-process run")
    ap.add_argument("--json", default=None)
    ap.add_argument("--omp-active", action="store_true", help="keep OpenMP's default (spinning) wait policy")
    ap.add_argument(
        "--ablation", action="store_true", help="run the design ablation on the dev split instead"
    )
    ap.add_argument(
        "--calibration-ablation",
        action="store_true",
        help="compare calibration texts (BoolQ alone vs + CoQA stories) on the dev text instead",
    )
    ap.add_argument("--fisher-samples", type=int, default=4)
    args = ap.parse_args()
    if args.ablation:
        return ablation(args)
    if args.calibration_ablation:
        return calibration_ablation(args)
    methods = [m for m in args.methods.split(",") if m]

    import torch

    from zipkd.data.assets import heldout_text_path
    from zipkd.data.text import load_texts
    from zipkd.evaluate.perplexity import perplexity
    from zipkd.latency.measure import compare_ms
    from zipkd.models.io import load_model
    from zipkd.prune import PruneConfig, prune
    from zipkd.prune.api import latency_table

    t_bench = time.perf_counter()
    regime = bench_regime()
    lm = load_model(args.model)
    _log("latency table")
    table = latency_table(lm, PruneConfig(regime=regime, table=args.table))
    table_path = args.table or table.meta.get("cache_path")
    args.table = table_path
    result: dict = {
        "machine": {
            "cpu": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        },
        "table": {
            "path": table_path,
            "dense_ms": table.dense_ms(),
            "measured_dense_ms": table.measured_dense_ms,
        },
        "samples": args.samples,
        "calib_len": args.calib_len,
        "seed": args.seed,
    }

    tmp = Path(tempfile.mkdtemp(prefix="zipkd-bench-prune-"))
    cli = None
    if not args.skip_cli:
        _log("timed `zipkd prune -t 2x` (child process)")
        cli = timed_cli_prune(args, tmp / "cli-2x")
        result["cli_2x"] = {k: v for k, v in cli.items() if k != "stdout"}
        _log(f"  {cli['wall_s']:.0f} s, peak RSS {cli['peak_rss_gb']:.2f} GB")

    heldout = load_texts(heldout_text_path())
    rows: list[dict] = []

    def evaluate(name: str, target: float | None, model, info: dict) -> None:
        _log(f"evaluate {name} @ {target}")
        ppl = perplexity(model, lm.tokenizer, heldout, max_length=512, max_tokens=args.ppl_tokens)[
            "perplexity"
        ]
        acc = arc_accuracy(model, lm.tokenizer, args.arc)
        speed = None
        if model is not lm.model:
            st = compare_ms([lm.model, model], regime, warmup=2, repeats=args.repeats)
            speed = st[0]["median_ms"] / st[1]["median_ms"]
        rows.append(
            {
                "method": name,
                "target": target,
                "perplexity": ppl,
                "arc_easy": acc,
                "measured_speedup": speed,
                **info,
            }
        )
        _log(f"  ppl {ppl:.2f}, arc {acc}, measured {speed}")

    evaluate("dense", None, lm.model, {})
    identical = None
    for method in methods:
        config = bench_config(args, regime, target_speedup=TARGETS, method=method, table=table_path)
        _log(f"prune {method} {TARGETS}")
        t0 = time.perf_counter()
        results = prune(lm, config, table=table)
        secs = time.perf_counter() - t0
        for r in results:
            if method == "zipkd" and r.target == 2.0 and cli is not None:
                from safetensors.torch import load_file

                saved = {}
                for f in sorted((tmp / "cli-2x").glob("*.safetensors")):
                    saved.update(load_file(str(f)))
                mine = r.model.state_dict()
                identical = all(torch.equal(saved[k], mine[k]) for k in saved) and set(saved) <= set(mine)
            evaluate(
                method,
                r.target,
                r.model,
                {
                    "predicted_speedup": r.predicted_speedup,
                    "prune_family_s": secs,
                    "layers": sum(1 for s in r.shapes if not s.empty),
                    "shapes": [[s.kv_heads, s.intermediate] for s in r.shapes],
                },
            )
        del results

    # ---- verdicts
    misses: list[str] = []
    for t in TARGETS:
        at = [r for r in rows if r["target"] == t]
        best = min(at, key=lambda r: r["perplexity"])
        if best["method"] != "zipkd":
            misses.append(f"{t}x: lowest perplexity is {best['method']}, not zipkd")
        z = next((r for r in at if r["method"] == "zipkd"), None)
        if z and abs(z["measured_speedup"] / t - 1) > SPEED_TOL:
            misses.append(
                f"{t}x: zipkd measured speedup {z['measured_speedup']:.2f}x is off by more than 10%"
            )
    if cli is not None:
        if cli["wall_s"] > BUDGET_S:
            misses.append(f"2x pruning took {cli['wall_s']:.0f} s > {BUDGET_S:.0f} s")
        if cli["peak_rss_gb"] > BUDGET_RSS_GB:
            misses.append(f"2x pruning peak RSS {cli['peak_rss_gb']:.2f} GB > {BUDGET_RSS_GB} GB")
        if identical is False:
            misses.append("same seed twice did not give bit-identical weights")
    result.update(
        rows=rows, bit_identical=identical, misses=misses, bench_s=round(time.perf_counter() - t_bench, 1)
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    print(
        f"\nSmolLM2-135M, CPU prefill 1x512 fp32, calibration {args.samples}x{args.calib_len} tokens, "
        f"seed {args.seed}; perplexity on {args.ppl_tokens} held-out LAMBADA tokens; ARC-Easy acc_norm "
        f"({args.arc} questions)"
    )
    print(f"{'method':<10} {'target':>6} {'pred':>6} {'measured':>9} {'ppl':>8} {'arc':>6}")
    for r in rows:
        tgt = f"{r['target']:g}x" if r["target"] else "-"
        pred = f"{r['predicted_speedup']:.2f}x" if r.get("predicted_speedup") else "-"
        meas = f"{r['measured_speedup']:.2f}x" if r["measured_speedup"] else "-"
        arc = f"{r['arc_easy']:.2f}" if r["arc_easy"] is not None else "-"
        print(f"{r['method']:<10} {tgt:>6} {pred:>6} {meas:>9} {r['perplexity']:>8.2f} {arc:>6}")
    if cli is not None:
        print(
            f"zipkd prune -t 2x: {cli['wall_s']:.0f} s wall, peak RSS {cli['peak_rss_gb']:.2f} GB; "
            f"same seed bit-identical: {identical}"
        )
    print("MISSES: " + "; ".join(misses) if misses else "all targets met")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
