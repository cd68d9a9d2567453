"""Benchmark for `zipkd recover` (issue #5): does self-data distillation recover what pruning lost?

On the embedded SmolLM2-135M-Instruct pruned to 2x (zipkd's own pruner, `zipkd.prune`, cached after the first
run; `--pruner shortgpt|wanda-sp|magnitude` uses one of zipkd's baselines instead), every recovery arm gets the same
budget (steps, batch, sequence length, learning rate, seed) and is scored on held-out data only:

- perplexity on LAMBADA passages (`heldout_text_path()`, evaluation role; never trained on), and
- lm-eval accuracy (ARC-Easy and PIQA, `--limit` questions each) on the evaluation partition.

Arms (the fine-tuning data are the same seeded subset of zipkd's fine-tuning set: GSM8K, CommonsenseQA, Social
IQa, OpenBookQA, NQ-open — none of them an evaluation task):
- `sft`: plain SFT on the original responses (cross-entropy on the response tokens);
- `sdd+kd`: zipkd recover's default recipe (self-data distillation) — the teacher's rewrites (originals kept
  where the final answer changed), plus forward-KL logit distillation against the teacher and three quarters
  of the steps on calibration-role prose (BoolQ passages and CoQA stories; disjoint from the evaluation data).
  Defaults (prose share 0.75, 240 steps, bf16 autocast on AMX CPUs) were chosen on the development text
  (dev.txt), which is also reported (not a target).
- with `--all-arms`, to isolate the parts: `sdd` (the rewrites alone, no KD, no prose) and `sft+kd` (the recipe
  on the original responses).

Targets (the script exits 1 when one is missed): the default recipe retains more of the dense model's quality
than plain SFT (mean over the held-out metrics of the retention ratio: accuracy/dense accuracy, dense ppl/ppl),
it recovers at least half of the perplexity lost to pruning ((ppl_pruned − ppl)/(ppl_pruned − ppl_dense) ≥ 0.5),
and the recovery itself — teacher rewrites plus training, what `zipkd recover` costs a user — takes at most 30
minutes. The whole benchmark (two arms, four evaluations) takes longer; its wall time is reported. The 2x model
is built once and cached (its pruning time is reported, not counted).

    python scripts/bench_recover.py                 # the full benchmark (≈ 30 min on 2 idle cores)
    python scripts/bench_recover.py --quick         # a few minutes, tiny budgets (checks the script only)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

# On a shared CPU, OpenMP threads spinning while they wait for each other starve everyone (the latency bench
# measured the same); passive waiting keeps the default thread count and makes training ~10x faster here.
# Set before torch is imported. `--omp-active` keeps OpenMP's default.
if "--omp-active" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

TARGET_MINUTES = 30.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def get_pruned(method: str, root: Path) -> tuple[Path, dict]:
    """The 2x model, built once and cached in `root` (it does not depend on anything recovery does)."""
    import hashlib

    from zipkd.data.assets import calib_text_path
    from zipkd.manifest import content_hash, read_manifest
    from zipkd.models.io import load_model
    from zipkd.prune import PruneConfig, prune, save_pruned
    from zipkd.prune.api import latency_table

    t = time.perf_counter()
    lm = load_model("smollm2-135m")
    cfg = PruneConfig(target_speedup=2.0, method=method)
    # Keyed by the pruning config and the latency table it uses (cached or profiled now): a re-measured table
    # (another machine, a quieter one) or another pruner config makes a new model instead of reusing a stale one.
    # "v2": models pruned before content_hash hashed folders under hidden directories recorded an empty teacher
    # hash, which recovery now (rightly) refuses as a changed teacher.
    # The calibration text's hash too: another export of the offline data calibrates differently.
    table = latency_table(lm, cfg)
    calib = content_hash(calib_text_path())
    key = hashlib.sha256(
        json.dumps(["v2", repr(cfg), table.to_json(), calib], sort_keys=True).encode()
    ).hexdigest()[:12]
    folder = root / f"pruned-2x-{method}-{key}"
    if (folder / "zipkd.json").is_file():
        return folder, {"cached": True, **(read_manifest(folder) or {}).get("metrics", {})}
    save_pruned(prune(lm, cfg, table=table), lm, folder, cfg, force=True)
    return folder, {
        "cached": False,
        "seconds": time.perf_counter() - t,
        **(read_manifest(folder) or {})["metrics"],
    }


def evaluate(path, tasks, limit, ppl_tokens) -> dict:
    from zipkd.data.assets import dev_text_path, heldout_text_path
    from zipkd.data.text import load_texts
    from zipkd.evaluate.harness import run_tasks
    from zipkd.evaluate.perplexity import perplexity
    from zipkd.models.io import load_model

    lm = load_model(path)
    t = time.perf_counter()
    ppl = perplexity(
        lm.model, lm.tokenizer, load_texts(heldout_text_path()), max_length=512, max_tokens=ppl_tokens
    )["perplexity"]
    # Development text (never trained on; what the settings were chosen on) — reported, not a target.
    dev = perplexity(
        lm.model, lm.tokenizer, load_texts(dev_text_path()), max_length=512, max_tokens=ppl_tokens
    )["perplexity"]
    acc = {}
    if tasks:
        res = run_tasks(lm.model, lm.tokenizer, tasks, limit=limit, batch_size=8, max_length=512)
        acc = {k: v.score for k, v in res.items()}
    return {"perplexity": ppl, "dev_perplexity": dev, "acc": acc, "eval_s": time.perf_counter() - t}


def retention(m: dict, dense: dict) -> float:
    """Mean over held-out metrics of quality relative to dense (accuracy ratio; dense ppl / ppl)."""
    parts = [m["acc"][k] / dense["acc"][k] for k in dense["acc"] if dense["acc"][k] > 0]
    parts.append(dense["perplexity"] / m["perplexity"])
    return sum(parts) / len(parts)


def throughput(args) -> int:
    """Tokens/s of recovery steps on the 2x model: the earlier code path (padded batches, the plain head/loss:
    `pack=False, fused_loss=False`) against the current one (packed batches, the fused head/loss), timed
    alternately (2 rounds of 6 steps each, the first step of a run not counted) on the real training mix:
    fine-tuning examples (original responses) and calibration prose at the default mix ratio, the default KD.
    Both paths train on the same examples with the same loss; tokens are the sequences' real tokens."""
    import copy
    import statistics

    from zipkd.data.assets import calib_text_path, finetune_path
    from zipkd.data.text import load_texts
    from zipkd.models.io import load_model
    from zipkd.paths import cache_dir, offline_env
    from zipkd.recover.data import encode_examples, load_examples, select_examples, text_windows
    from zipkd.recover.train import TrainConfig, train

    offline_env()
    pruned_path = args.student or get_pruned(args.pruner, cache_dir() / "bench_recover")[0]
    student = load_model(pruned_path)
    teacher = load_model("smollm2-135m", tokenizer=False).model
    tok = student.tokenizer
    qa = encode_examples(
        tok, select_examples(load_examples(finetune_path()), 64, args.seed), args.max_seq_len
    )
    text = text_windows(tok, load_texts(calib_text_path()), args.text_window, limit=64)
    steps = 2 if args.quick else args.throughput_steps
    paths = {"earlier (padded, plain loss)": dict(pack=False, fused_loss=False), "current": {}}
    rates: dict[str, list[float]] = {name: [] for name in paths}
    import tempfile

    for r in range(1 if args.quick else 2):
        for name, over in paths.items():
            cfg = TrainConfig(steps=steps, batch_size=args.batch_size, checkpoint_every=10**6, **over)
            times: list[float] = []
            last = [time.perf_counter()]

            def tick(step, metrics, times=times, last=last):
                now = time.perf_counter()
                times.append(now - last[0])
                last[0] = now

            with tempfile.TemporaryDirectory() as work:
                res = train(
                    copy.deepcopy(student.model),
                    teacher,
                    qa,
                    text,
                    cfg,
                    work,
                    tok.pad_token_id,
                    callback=tick,
                )
            per_step = res.tokens / steps
            rate = per_step * (steps - 1) / sum(times[1:])
            rates[name].append(rate)
            log(f"round {r + 1} {name}: {rate:.0f} tok/s")
    old, new = (statistics.median(v) for v in rates.values())
    print(
        f"\nRecovery step throughput, 2x SmolLM2 ({args.pruner}), batch {args.batch_size}, KD forward against the "
        f"dense teacher, mix ratio {TrainConfig().mix_ratio}, this CPU: earlier path {old:.0f} tok/s, current "
        f"{new:.0f} tok/s: {new / old:.2f}x (target 4x, issue #18)"
    )
    return 0 if new / old >= 4 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="results folder (default: cache/bench_recover)")
    from zipkd.prune.methods import METHODS

    ap.add_argument("--pruner", choices=tuple(METHODS), default="zipkd")
    ap.add_argument("--examples", type=int, default=128, help="fine-tuning examples (teacher rewrites)")
    ap.add_argument("--steps", type=int, default=240)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--text-window", type=int, default=128, help="tokens per prose window (~ a QA sequence)")
    ap.add_argument("--lr", type=float, default=3e-4, help="peak lr, all arms (chosen on calibration text)")
    ap.add_argument("--tasks", default="arc_easy,piqa")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument(
        "--all-arms",
        action="store_true",
        help="also sdd (rewrites alone) and sft+kd (isolate the data's share)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny budgets: checks the script, not the method")
    ap.add_argument("--omp-active", action="store_true", help="keep OpenMP's default (spinning) wait policy")
    ap.add_argument(
        "--throughput",
        action="store_true",
        help="only time training steps: the plain head/loss path against the fused one, alternately",
    )
    ap.add_argument(
        "--student", default=None, help="--throughput: this pruned model instead of the cached 2x one"
    )
    ap.add_argument(
        "--throughput-steps",
        type=int,
        default=12,
        help="--throughput: steps per timed run (first not counted)",
    )
    args = ap.parse_args()
    if args.throughput:
        return throughput(args)
    if args.quick:
        args.examples, args.steps, args.limit, args.ppl_tokens, args.max_new_tokens = 16, 4, 10, 1024, 32
        args.max_seq_len, args.batch_size, args.text_window = 128, 4, 64

    from zipkd.paths import cache_dir, offline_env

    offline_env()
    import torch

    from zipkd.data.assets import finetune_path
    from zipkd.latency.measure import compare_ms
    from zipkd.latency.table import Regime
    from zipkd.manifest import content_hash, hardware_fingerprint, read_manifest
    from zipkd.models.io import load_model
    from zipkd.recover.api import RecoverConfig, recover
    from zipkd.recover.data import RewriteSettings, load_examples, select_examples, self_distill
    from zipkd.recover.train import TrainConfig

    root = args.out or cache_dir() / "bench_recover"
    root.mkdir(parents=True, exist_ok=True)
    tasks = [t for t in args.tasks.split(",") if t]
    result: dict = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "hardware": hardware_fingerprint(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }

    log(f"[1/5] 2x model ({args.pruner})")
    pruned_path, prune_info = get_pruned(args.pruner, cache_dir() / "bench_recover")
    result["prune"] = {
        "path": str(pruned_path),
        **{k: v for k, v in prune_info.items() if not isinstance(v, dict)},
    }
    t_bench = time.perf_counter()
    dense = load_model("smollm2-135m")
    pruned = load_model(pruned_path)
    speed = compare_ms([dense.model, pruned.model], Regime(), warmup=1, repeats=3 if args.quick else 5)
    result["speedup_prefill_b1_s512"] = speed[0]["median_ms"] / speed[1]["median_ms"]
    result["params"] = {
        "dense": sum(p.numel() for p in dense.model.parameters()),
        "pruned": sum(p.numel() for p in pruned.model.parameters()),
    }
    log(f"      measured speedup {result['speedup_prefill_b1_s512']:.2f}x (prefill 1x512, alternating)")
    del pruned

    log("[2/5] teacher rewrites (self-data distillation; cached by content hash)")
    settings = RewriteSettings(max_new_tokens=args.max_new_tokens)
    examples = select_examples(load_examples(finetune_path()), args.examples, args.seed)
    t = time.perf_counter()
    ds = self_distill(dense.model, dense.tokenizer, examples, settings, content_hash(dense.path))
    # A cached set was generated by an earlier run: its recorded generation time still counts below.
    gen_s = ds.stats.get("generation_s", 0.0) if ds.cached else time.perf_counter() - t
    result["distill"] = {**ds.stats, "seconds": gen_s, "cached": ds.cached}
    log(
        f"      {ds.stats['rewritten']}/{len(examples)} rewritten in {result['distill']['seconds']:.0f} s "
        f"({'cache' if ds.cached else 'generated'})"
    )
    del dense

    common = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        seed=args.seed,
        lr=args.lr,
        checkpoint_every=max(args.steps, 1) + 1,
    )
    arms = {
        "sft": (False, TrainConfig(kd="none", mix_ratio=0.0, **common)),
        "sdd+kd": (True, TrainConfig(**common)),  # the library's defaults: forward KL 0.5, prose mix 0.75
    }
    if args.all_arms:
        arms["sdd"] = (True, TrainConfig(kd="none", mix_ratio=0.0, **common))
        arms["sft+kd"] = (False, TrainConfig(**common))
    result["arms"] = {}
    for i, (name, (distill, tcfg)) in enumerate(arms.items()):
        log(f"[3/5] recovery arm {i + 1}/{len(arms)}: {name}")
        cfg = RecoverConfig(
            distill=distill,
            max_examples=args.examples,
            rewrite=settings,
            train=tcfg,
            text_window=args.text_window,
        )
        t = time.perf_counter()
        out = recover(str(pruned_path), cfg, root / f"recovered-{name.replace('+', '-')}", force=True)
        m = (read_manifest(out) or {}).get("metrics", {})
        result["arms"][name] = {
            "path": str(out),
            "seconds": time.perf_counter() - t,
            "steps": m.get("steps"),
            "tokens": m.get("tokens"),
            "target_tokens": m.get("target_tokens"),
            "tokens_per_s": m.get("tokens_per_s"),
            "final_loss": m.get("final_loss"),
            "kd": tcfg.kd,
            "mix_ratio": tcfg.mix_ratio,
            "lr": tcfg.learning_rate,
            "precision": (read_manifest(out) or {}).get("config", {}).get("train", {}).get("precision"),
        }
        log(
            f"      {m.get('tokens')} tokens, {m.get('tokens_per_s', 0):.0f} tok/s, "
            f"{result['arms'][name]['seconds']:.0f} s"
        )

    log("[4/5] held-out evaluation")
    models = {
        "dense": "smollm2-135m",
        "pruned": str(pruned_path),
        **{k: v["path"] for k, v in result["arms"].items()},
    }
    scores = {}
    for name, path in models.items():
        scores[name] = evaluate(path, tasks, args.limit, args.ppl_tokens)
        s = scores[name]
        log(
            f"      {name:8s} ppl {s['perplexity']:8.2f}  "
            + "  ".join(f"{k} {v:.3f}" for k, v in s["acc"].items())
        )
    result["scores"] = scores
    wall = time.perf_counter() - t_bench
    result["bench_minutes"] = (wall + (gen_s if ds.cached else 0.0)) / 60  # cached rewrites still count
    result["recovery_minutes"] = (gen_s + result["arms"]["sdd+kd"]["seconds"]) / 60

    d, p = scores["dense"], scores["pruned"]
    for s in scores.values():
        s["retention"] = retention(s, d)
        lost = p["perplexity"] - d["perplexity"]
        s["ppl_recovered"] = (p["perplexity"] - s["perplexity"]) / lost if lost > 0 else float("nan")
        lost_log = math.log(p["perplexity"]) - math.log(d["perplexity"])
        s["log_ppl_recovered"] = (
            (math.log(p["perplexity"]) - math.log(s["perplexity"])) / lost_log
            if lost_log > 0
            else float("nan")
        )
    main_arm, base = scores["sdd+kd"], scores["sft"]
    checks = {
        "recipe_beats_plain_sft": main_arm["retention"] > base["retention"],
        "half_of_ppl_recovered": main_arm["ppl_recovered"] >= 0.5,
        "recovery_within_30_minutes": result["recovery_minutes"] <= TARGET_MINUTES,
    }
    result["checks"] = checks
    if "sdd" in scores:
        result["sdd_alone_beats_plain_sft"] = scores["sdd"]["retention"] > base["retention"]
    (root / "bench_recover.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    print(
        "\n[5/5] results (held-out: LAMBADA perplexity, "
        + ", ".join(f"{t} acc_norm" for t in tasks)
        + f"; limit {args.limit})"
    )
    head = (
        f"{'model':9s} {'ppl':>8s} "
        + " ".join(f"{t:>9s}" for t in tasks)
        + f" {'retain':>7s} {'ppl rec':>8s} {'dev ppl':>8s} {'tokens':>8s} {'train s':>8s}"
    )
    print(head)
    for name, s in scores.items():
        arm = result["arms"].get(name, {})
        print(
            f"{name:9s} {s['perplexity']:8.2f} "
            + " ".join(f"{s['acc'].get(t, float('nan')):9.3f}" for t in tasks)
            + f" {s['retention']:7.3f} {s['ppl_recovered']:8.1%} {s['dev_perplexity']:8.2f}"
            + f" {arm.get('tokens', 0) or 0:8d}"
            + f" {arm.get('seconds', 0):8.0f}"
        )
    print(
        f"2x model: {args.pruner} pruner, measured speedup {result['speedup_prefill_b1_s512']:.2f}x "
        f"(CPU prefill 1x512); rewrites kept {ds.stats['rewritten']}/{len(examples)} "
        f"(generated in {gen_s / 60:.1f} min); zipkd recover run (rewrites + training) "
        f"{result['recovery_minutes']:.1f} min"
        + (
            f"; self-data distillation alone vs plain SFT: retention {scores['sdd']['retention']:.3f} vs "
            f"{base['retention']:.3f}"
            if "sdd" in scores
            else ""
        )
    )
    ok = all(checks.values())
    print(
        f"HEADLINE recover: perplexity {d['perplexity']:.1f} dense → {p['perplexity']:.1f} pruned → "
        f"{main_arm['perplexity']:.1f} recovered ({main_arm['ppl_recovered']:.0%} of the loss recovered, target "
        f"≥ 50%); retention {main_arm['retention']:.3f} (zipkd recover) vs {base['retention']:.3f} (plain SFT); "
        f"recovery {result['recovery_minutes']:.1f} min (target ≤ {TARGET_MINUTES:.0f}; whole bench "
        f"{result['bench_minutes']:.1f} min) — "
        + ("PASS" if ok else "MISS: " + ", ".join(k for k, v in checks.items() if not v))
    )
    return 0 if ok or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
