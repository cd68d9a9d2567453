"""GPU checks of issue #20 on an 8B-shaped random-weight Llama (hidden 4096, 32 heads / 8 KV heads, head_dim 128,
MLP 14336, vocab 128256; 8 layers), bf16. One prepared run, hard-stopped at --budget-s:

(a) Decode-table prediction error of the in-model method (the GPU default for decode): batch 16 over 2,048
    cached tokens, eager and CUDA graphs; ≥ 8 random pruned variants each, measured alternately with the dense
    model. Target: median |predicted/measured speedup − 1| ≤ 5%.
(b) The prune check with the current table methods: one database (random calibration tokens on the GPU), the 2x
    structure searched on the prefill 1×2048 table (anchored) and on the decode table (in-model, eager), each
    measured against the dense model in its regime. Target: |predicted/measured − 1| ≤ 5%.
(c) `--layout uniform` against heterogeneous at 2x on the CUDA-graphs decode table: measured decode speedups.

Weights and tokens are random (nothing can travel to the GPU machine), so (b) and (c) measure speed, not
quality; the speed-only models are cut without the OBS re-fit (weights values do not change the timing).
Writes OUT/gpu_layout.json after every step.

    python scripts/gpu_layout.py --out OUT            # on the GPU machine (≈ 4-6 minutes on an H200)
    python scripts/gpu_layout.py --out OUT --smoke    # tiny shapes on CPU, eager only: checks the script
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_latency import MODEL_KEYS, build_model  # noqa: E402

TARGET = 0.05
RESULT: dict = {"ok": False, "stage": "start", "checks": {}}


class _Timeout(Exception):
    pass


def _alarm(_sig, _frame):
    raise _Timeout


def _write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_layout.json").write_text(json.dumps(RESULT, indent=2, default=str) + "\n")


def run(args) -> None:
    import torch

    from zipkd.latency.measure import compare_ms
    from zipkd.latency.profile import profile_model
    from zipkd.latency.table import Regime
    from zipkd.latency.validate import validate_table
    from zipkd.prune.driver import apply_choice, build_database, capture_inputs
    from zipkd.prune.search import max_uniform_speedup, select, select_layout_uniform

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke on CPU")
    dev, dtype_name = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    dtype = getattr(torch, dtype_name)
    RESULT.update(device=torch.cuda.get_device_name(0) if cuda else "cpu (smoke)", torch=torch.__version__)
    if args.smoke:
        ctx, seq, batch, n_var, warm, reps = 64, 64, 2, 3, 1, 3
    else:
        ctx, seq, batch, n_var, warm, reps = 2048, 2048, 16, args.variants, 2, 7
    model = build_model(args.smoke, args.layers, dev, dtype).eval()  # the latency check's model
    shape = {k: v for k, v in model.config.to_dict().items() if k in MODEL_KEYS}
    RESULT["model"] = shape

    def decode(runtime: str) -> Regime:
        return Regime(
            device=dev, regime="decode", batch=batch, context=ctx, dtype=dtype_name, runtime=runtime
        )

    runtimes = ["eager", "cudagraphs"] if cuda else ["eager"]
    tables = {}
    # (a) in-model decode tables, validated on random variants
    for rt in runtimes:
        RESULT["stage"] = f"a-{rt}"
        t0 = time.time()
        tab = profile_model(model, decode(rt), warmup=warm, repeats=reps, method="in-model")
        build_s = time.time() - t0
        rep = validate_table(
            model, tab, n=n_var, speedup_range=(1.2, 3.0), warmup=warm, repeats=reps, group=4
        )
        tables[rt] = tab
        RESULT["checks"][f"a_decode_{rt}"] = {
            "table_s": round(build_s, 1),
            "median_abs_speedup_error": rep.median_abs_speedup_error,
            "variants": [[v.predicted_speedup, v.measured_speedup] for v in rep.variants],
            "pass": rep.median_abs_speedup_error <= TARGET,
        }
        print(f"(a) decode {rt}: median |pred/meas - 1| = {rep.median_abs_speedup_error:.1%}", flush=True)
        _write(args.out)

    # (b) one database; the 2x structure of the prefill and decode tables, each measured in its regime
    RESULT["stage"] = "b-profile-prefill"
    prefill = Regime(device=dev, regime="prefill", batch=1, seq_len=seq, dtype=dtype_name)
    tables["prefill"] = profile_model(model, prefill, warmup=warm, repeats=reps)
    RESULT["stage"] = "b-database"
    t0 = time.time()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape["vocab_size"], (8 if cuda else 2, 512 if cuda else 64), generator=g)
    model.to("cpu")
    acts = capture_inputs(model, tokens, 4, torch.device(dev))
    tab0 = tables["prefill"]
    db = build_database(
        model,
        acts,
        "zipkd",
        tab0.attention_levels,
        tab0.mlp_levels,
        0.01,
        torch.device(dev),
        max(1, shape["intermediate_size"] // 64),
    )
    RESULT["database_s"] = round(time.time() - t0, 1)
    del acts
    model.to(dev)

    def cut(shapes):
        return apply_choice(model, db, shapes, None, "none", device=torch.device(dev)).eval()

    for name, tab, regime in (
        ("prefill", tables["prefill"], prefill),
        ("decode_eager", tables["eager"], decode("eager")),
    ):
        RESULT["stage"] = f"b-{name}"
        choice = select(db, tab, 2.0)
        pruned = cut(choice.shapes)
        st = compare_ms([model, pruned], regime, warmup=warm, repeats=reps)
        meas = st[0]["median_ms"] / st[1]["median_ms"]
        err = choice.predicted_speedup / meas - 1
        RESULT["checks"][f"b_prune_{name}"] = {
            "predicted_speedup": choice.predicted_speedup,
            "measured_speedup": meas,
            "error": err,
            "pass": abs(err) <= TARGET,
            "shapes": [[s.kv_heads, s.intermediate] for s in choice.shapes],
        }
        print(
            f"(b) prune 2x on the {name} table: predicted {choice.predicted_speedup:.2f}x, measured {meas:.2f}x",
            flush=True,
        )
        del pruned
        _write(args.out)

    # (c) uniform against heterogeneous, CUDA graphs decode
    rt = runtimes[-1]
    RESULT["stage"] = f"c-{rt}"
    tab = tables[rt]
    # Tiny smoke shapes are overhead-bound, so a noisy CPU table may not reach 2x with one uniform shape; the
    # smoke run checks the code path at what its table reaches (a GPU run always asks for 2x).
    target = min(2.0, 0.98 * max_uniform_speedup(tab)) if args.smoke else 2.0
    het, uni = select(db, tab, target), select_layout_uniform(db, tab, target)
    m_het, m_uni = cut(het.shapes), cut(uni.shapes)
    st = compare_ms([model, m_het, m_uni], decode(rt), warmup=warm, repeats=reps)
    RESULT["checks"][f"c_layouts_decode_{rt}"] = {
        "target": target,
        "heterogeneous": {
            "predicted": het.predicted_speedup,
            "measured": st[0]["median_ms"] / st[1]["median_ms"],
        },
        "uniform": {
            "predicted": uni.predicted_speedup,
            "measured": st[0]["median_ms"] / st[2]["median_ms"],
            "layers": sum(1 for s in uni.shapes if not s.empty),
            "shape": next([s.kv_heads, s.intermediate] for s in uni.shapes if not s.empty),
        },
    }
    c = RESULT["checks"][f"c_layouts_decode_{rt}"]
    print(
        f"(c) decode {rt} {target:.2f}x: heterogeneous measured {c['heterogeneous']['measured']:.2f}x, uniform "
        f"{c['uniform']['measured']:.2f}x ({c['uniform']['layers']} layers at {c['uniform']['shape']})",
        flush=True,
    )
    RESULT["stage"] = "done"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script only)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--variants", type=int, default=8)
    ap.add_argument("--budget-s", type=int, default=420, help="hard stop (the JSON keeps what was done)")
    args = ap.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.budget_s)
    t0 = time.time()
    try:
        run(args)
        RESULT["ok"] = True
    except _Timeout:
        RESULT["error"] = f"hard stop after {args.budget_s} s at stage {RESULT['stage']}"
    except Exception as exc:  # noqa: BLE001 - report whatever failed
        RESULT["error"] = f"{type(exc).__name__}: {exc}"
        RESULT["traceback"] = traceback.format_exc()[-4000:]
    finally:
        signal.alarm(0)
        RESULT["wall_s"] = round(time.time() - t0, 1)
        _write(args.out)
    checks = RESULT["checks"]
    for name, c in checks.items():
        print(f"SUMMARY {name}: {json.dumps(c, default=str)[:300]}")
    passed = [c.get("pass") for c in checks.values() if "pass" in c]
    if RESULT.get("error"):
        print(f"ERROR: {RESULT['error']}")
    if args.smoke:
        print("(smoke run: tiny shapes on a CPU check that the script works; its numbers mean nothing)")
        return 0 if RESULT["ok"] else 1
    ok = RESULT["ok"] and all(passed)
    print(f"RESULT: {'PASS' if ok else 'MISS'} (targets ≤ {TARGET:.0%}) on {RESULT['device']}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
