"""Bench: zipkd in llama.cpp, the CPU serving engine (SmolLM2-135M, 2 threads).

1. Parity: F32 GGUFs in llama.cpp against the same model in torch on the same held-out token ids: relative
   perplexity difference <= 0.1% and identical 32-token greedy continuations, for the dense model, a uniform
   pruned one (magnitude: one width everywhere, written as llama.cpp's `llama`) and heterogeneous ones (zipkd's
   2x, and one holding every layer type: attention removed, MLP removed, both removed, varied KV heads/widths).
2. Speed in the engine: latency tables profiled in llama.cpp at Q8_0 for decode (64 tokens after a 128-token
   prompt) and prefill 1x512; each validated on >= 8 random layouts (median prediction error <= 10%); zipkd
   pruned to 1.5x and 2x with each table, exported to Q8_0 and measured round-robin against the dense Q8_0
   GGUF (within +-10% of the target).
3. One table: dense torch fp32; dense llama.cpp F32/Q8_0/Q4_K_M; zipkd 1.5x and 2x (decode tables) at
   F32/Q8_0/Q4_K_M: decode tok/s, prefill ms, held-out perplexity, file size. Headline: zipkd 2x Q8_0 decode
   tok/s / dense torch fp32 decode tok/s (target >= 13x).
4. Bad input: each refusal is one line, no traceback.
Prints the headline figures last; exits 1 when a target is missed.

    .venv/bin/python scripts/bench_llamacpp.py [--json out.json] [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARITY_PPL = 0.001
SPEED_TOL = 0.10
PRED_ERR = 0.10
HEADLINE = 13.0
QUANTS = ("f32", "q8_0", "q4_k_m")


def heldout_windows(tokenizer, max_tokens: int, max_length: int = 512) -> list[list[int]]:
    """The token windows `zipkd.evaluate.perplexity` scores: the held-out stream cut into max_length windows."""
    from zipkd.data.assets import heldout_text_path
    from zipkd.data.text import load_texts, token_stream

    stream = token_stream(tokenizer, load_texts(heldout_text_path()))[: max_tokens + 1]
    n = (stream.numel() - 1) // max_length
    return stream[: n * max_length].view(n, max_length).tolist()


def torch_ppl(model, windows) -> float:
    import torch

    nll, count = 0.0, 0
    with torch.inference_mode():
        for w in windows:
            x = torch.tensor([w])
            logits = model(x).logits.float()
            nll += torch.nn.functional.cross_entropy(logits[0, :-1], x[0, 1:], reduction="sum").item()
            count += len(w) - 1
    return math.exp(nll / count)


def engine_ppl(path: Path, windows, threads: int) -> float:
    from zipkd.runtimes.llamacpp import open_model, windows_nll

    with open_model(
        path, threads=threads, n_ctx=len(windows[0]) + 8, n_batch=len(windows[0]), logits_all=True
    ) as em:
        nll, count = windows_nll(em, windows)
    return math.exp(nll / count)


def torch_greedy(model, prompt: list[int], n: int) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def engine_greedy(path: Path, prompt: list[int], n: int, threads: int) -> list[int]:
    from zipkd.runtimes.llamacpp import greedy, open_model

    with open_model(path, threads=threads, n_ctx=len(prompt) + n + 8) as em:
        return greedy(em, prompt, n)


def every_layer_type(lm):
    """A heterogeneous copy of the real model holding every layer type the search can choose."""
    import copy

    import torch

    from zipkd.models.adapters import adapter_for
    from zipkd.models.io import LoadedModel
    from zipkd.models.surgery import (
        base_geometry,
        remove_attention,
        remove_mlp,
        slice_attention,
        slice_mlp,
        sync_config,
    )

    m = copy.deepcopy(lm.model)
    ad = adapter_for(m.config)
    geo = base_geometry(m.config)
    layers = ad.layers(m)
    remove_attention(layers[0], ad)  # attention removed (layer 0: the export's zero-attention stand-in)
    remove_mlp(layers[1], ad)  # MLP removed behind kept attention (the deci defect)
    remove_attention(layers[2], ad)  # both removed
    remove_mlp(layers[2], ad)
    remove_attention(layers[9], ad)
    for i, (kv, width) in {3: (1, 320), 5: (2, 704), 7: (1, 1024), 12: (2, 128), 20: (1, 1536)}.items():
        slice_attention(layers[i], ad, geo.head_dim, geo.group_size, list(range(3 - kv, 3)))
        slice_mlp(layers[i], ad, torch.arange(width))
    remove_mlp(layers[29], ad)
    sync_config(m)
    return LoadedModel(m, lm.tokenizer, lm.path, "every-layer-type")


def export(lm, path: Path, quant: str) -> Path:
    from zipkd.export.api import ExportConfig
    from zipkd.export.api import export as run

    if not path.exists():
        run(lm, ExportConfig(quantization=quant), path)
    return path


def torch_speed(model, threads: int, repeats: int) -> dict:
    """Dense torch fp32 eager: prefill 1x512 ms and decode tok/s (64 tokens after a 128-token prompt, timed as
    generate(64) minus generate(1) over 63 tokens), alternating."""
    import torch

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 49000, (1, 128), generator=g)
    long = torch.randint(10, 49000, (1, 512), generator=g)
    pf, dec = [], []
    with torch.inference_mode():
        model(long, logits_to_keep=1)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(long, logits_to_keep=1)
            pf.append((time.perf_counter() - t0) * 1e3)
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            model.generate(prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False)
            t2 = time.perf_counter()
            dec.append(((t2 - t1) - (t1 - t0)) * 1e3 / 63)
    return {"prefill_ms": statistics.median(pf), "decode_tok_s": 1e3 / statistics.median(dec)}


def save_qwen3_heterogeneous(folder: Path) -> None:
    """A tiny Qwen3 with one MLP removed: heterogeneous, and llama.cpp has no per-layer graph with q/k norms."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from zipkd.models.adapters import adapter_for
    from zipkd.models.io import save_model
    from zipkd.models.surgery import remove_mlp, sync_config
    from zipkd.models.tiny import char_tokenizer

    cfg = AutoConfig.for_model(
        "qwen3",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    m = AutoModelForCausalLM.from_config(cfg)
    ad = adapter_for(cfg)
    remove_mlp(ad.layers(m)[1], ad)
    sync_config(m)
    save_model(m, char_tokenizer(), folder, "prune")


def bad_input_cases(work: Path) -> list[dict]:
    """The llama.cpp refusals through the real CLI, each timed: one line, exit 1, no traceback."""
    fake = work / "fake.gguf"
    fake.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    qwen3 = work / "qwen3-het"
    if not qwen3.exists():
        save_qwen3_heterogeneous(qwen3)
    zipkd = [sys.executable, "-m", "zipkd.cli"]
    cases = [
        (
            "export: heterogeneous qwen3 (no GGUF mapping)",
            [*zipkd, "export", str(qwen3), "-o", str(work / "q.gguf")],
        ),
        ("eval: corrupt .gguf", [*zipkd, "eval", str(fake), "--tasks", "piqa"]),
        ("profile: corrupt .gguf", [*zipkd, "profile", str(fake), "--runtime", "llama.cpp"]),
        (
            "profile: --runtime llama.cpp --quantization bnb-int8",
            [*zipkd, "profile", "--runtime", "llama.cpp", "--quantization", "bnb-int8"],
        ),
        (
            "export: llama.cpp missing",
            [
                sys.executable,
                "-c",
                "import sys; sys.modules['llama_cpp'] = None; from zipkd.cli import main; "
                f"sys.argv = ['zipkd', 'export', '-o', {str(work / 'm.gguf')!r}]; main()",
            ],
        ),
    ]
    rows = []
    for name, cmd in cases:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        err = proc.stderr.strip().splitlines()
        rows.append(
            {
                "case": name,
                "exit": proc.returncode,
                "traceback": "Traceback" in proc.stderr + proc.stdout,
                "lines": len(err),
                "seconds": round(time.perf_counter() - t0, 1),
                "message": err[0][:160] if err else "",
            }
        )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--work", default=None, help="folder for the GGUFs (default: a temporary folder)")
    ap.add_argument(
        "--fresh", action="store_true", help="re-measure the latency tables instead of using cached ones"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 variants, 1024 tokens, one target")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.quick:
        args.variants, args.repeats, args.ppl_tokens = 2, 2, 1024

    from zipkd.latency.llamacpp import measure_files, validate_llamacpp
    from zipkd.latency.profile import load_or_profile
    from zipkd.latency.table import Regime
    from zipkd.models.io import LoadedModel, load_model
    from zipkd.prune import PruneConfig
    from zipkd.prune import prune as run_prune

    t_start = time.perf_counter()
    work = Path(args.work or tempfile.mkdtemp(prefix="zipkd-bench-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    lm = load_model("smollm2-135m")
    windows = heldout_windows(lm.tokenizer, args.ppl_tokens)
    prompt = windows[0][:64]
    out: dict = {
        "machine": {"cpu": os.uname().machine, "threads": args.threads, "load_start": os.getloadavg()[0]}
    }
    misses: list[str] = []

    regimes = {
        "decode": Regime(
            regime="decode",
            runtime="llama.cpp",
            quantization="q8_0",
            threads=args.threads,
            context=128,
            decode_tokens=64,
        ),
        "prefill": Regime(
            regime="prefill", runtime="llama.cpp", quantization="q8_0", threads=args.threads, seq_len=512
        ),
    }
    targets = (2.0,) if args.quick else (1.5, 2.0)

    # ---- 2. tables, validation, pruning for each regime
    pruned: dict[str, dict[float, LoadedModel]] = {}
    out["speed"] = {}
    for name, reg in regimes.items():
        t0 = time.perf_counter()
        table = load_or_profile(lm, reg, remeasure=args.fresh, repeats=args.repeats)
        build_s = time.perf_counter() - t0
        rep = validate_llamacpp(lm, table, n=args.variants, repeats=args.repeats)
        results = run_prune(lm, PruneConfig(target_speedup=targets, regime=reg))
        pruned[name] = {
            r.target: LoadedModel(r.model, lm.tokenizer, lm.path, f"zipkd-{r.label}") for r in results
        }
        files = [export(lm, work / "dense-q8_0.gguf", "q8_0")]
        files += [export(p, work / f"zipkd-{name}-{t:g}x-q8_0.gguf", "q8_0") for t, p in pruned[name].items()]
        stats = measure_files(files, reg, warmup=1, repeats=max(5, args.repeats))
        dense_ms = stats[0]["median_ms"]
        rows = []
        for r, st in zip(results, stats[1:], strict=True):
            measured = dense_ms / st["median_ms"]
            rows.append({"target": r.target, "predicted": r.predicted_speedup, "measured": measured})
            if abs(measured / r.target - 1) > SPEED_TOL:
                misses.append(f"{name} {r.target:g}x measured {measured:.2f}x")
        err = rep.median_abs_speedup_error
        if err > PRED_ERR:
            misses.append(f"{name} table prediction error {err:.1%}")
        out["speed"][name] = {
            "table_build_s": round(build_s, 1),
            "cached_table": bool(table.meta.get("cached")),
            "prediction_median_error": err,
            "variants": [v.to_json() for v in rep.variants],
            "pruned": rows,
            "dense_ms": dense_ms,
        }
        print(
            f"[{name}] table {build_s:.0f} s, prediction error {err:.1%} over {len(rep.variants)} layouts; "
            + ", ".join(f"{x['target']:g}x → measured {x['measured']:.2f}x" for x in rows),
            flush=True,
        )

    # ---- 1. parity (F32 GGUF vs torch, same token ids)
    from zipkd.prune import PruneConfig as PC

    uniform = run_prune(lm, PC(target_speedup=1.5, method="magnitude", regime=regimes["prefill"]))[0]
    parity_models = {
        "dense": lm,
        "uniform (magnitude 1.5x)": LoadedModel(uniform.model, lm.tokenizer, lm.path, "uniform"),
        "zipkd 2x (decode table)": pruned["decode"][2.0],
        "every layer type": every_layer_type(lm),
    }
    out["parity"] = []
    for label, m in parity_models.items():
        path = export(m, work / f"parity-{label.split()[0]}-{len(out['parity'])}-f32.gguf", "f32")
        pt, pe = torch_ppl(m.model, windows), engine_ppl(path, windows, args.threads)
        gt, ge = torch_greedy(m.model, prompt, 32), engine_greedy(path, prompt, 32, args.threads)
        from zipkd.runtimes.llamacpp import gguf_metadata

        arch = gguf_metadata(path, keys=("general.architecture",))["general.architecture"]
        row = {
            "model": label,
            "arch": arch,
            "torch_ppl": pt,
            "llamacpp_ppl": pe,
            "rel_diff": pe / pt - 1,
            "greedy_equal": gt == ge,
        }
        out["parity"].append(row)
        if abs(row["rel_diff"]) > PARITY_PPL or not row["greedy_equal"]:
            misses.append(f"parity {label}: ppl {pt:.3f} vs {pe:.3f}, greedy equal {gt == ge}")
        print(
            f"[parity] {label} ({arch}): torch {pt:.3f}, llama.cpp {pe:.3f} ({row['rel_diff']:+.4%}), greedy equal {gt == ge}",
            flush=True,
        )

    # ---- 3. the one table
    rows = []
    ts = torch_speed(lm.model, args.threads, max(3, args.repeats))
    rows.append(
        {
            "model": "dense torch fp32 (eager)",
            **ts,
            "ppl": torch_ppl(lm.model, windows),
            "size_mib": sum(p.numel() * 4 for p in lm.model.parameters()) / 2**20,
        }
    )
    grid = {"dense": lm, **{f"zipkd {t:g}x": p for t, p in pruned["decode"].items()}}
    for q in QUANTS:
        files = {
            name: export(m, work / f"table-{name.replace(' ', '-')}-{q}.gguf", q) for name, m in grid.items()
        }
        dec = measure_files(list(files.values()), regimes["decode"], repeats=max(5, args.repeats))
        pre = measure_files(list(files.values()), regimes["prefill"], repeats=max(5, args.repeats))
        for (name, path), d, p in zip(files.items(), dec, pre, strict=True):
            rows.append(
                {
                    "model": f"{name} llama.cpp {q.upper()}",
                    "decode_tok_s": 1e3 / d["median_ms"],
                    "prefill_ms": p["median_ms"],
                    "ppl": engine_ppl(path, windows, args.threads),
                    "size_mib": path.stat().st_size / 2**20,
                }
            )
    out["table"] = rows
    head = next(r for r in rows if r["model"] == "zipkd 2x llama.cpp Q8_0")
    headline = head["decode_tok_s"] / rows[0]["decode_tok_s"]
    if headline < HEADLINE:
        misses.append(f"headline {headline:.1f}x < {HEADLINE:g}x")

    # ---- 4. bad input
    out["bad_input"] = bad_input_cases(work)
    for b in out["bad_input"]:
        if b["exit"] != 1 or b["traceback"] or b["lines"] != 1:
            misses.append(
                f"bad input '{b['case']}': exit {b['exit']}, traceback {b['traceback']}, {b['lines']} lines"
            )

    out["seconds"] = round(time.perf_counter() - t_start, 1)
    out["load_end"] = os.getloadavg()[0]
    out["misses"] = misses
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")

    print("\n| model | decode tok/s | prefill 1x512 ms | held-out ppl | file MiB |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['model']} | {r['decode_tok_s']:.1f} | {r['prefill_ms']:.0f} | {r['ppl']:.2f} | {r['size_mib']:.0f} |"
        )
    print("\n| bad input | exit | traceback | s | message |\n|---|---|---|---|---|")
    for b in out["bad_input"]:
        print(
            f"| {b['case']} | {b['exit']} | {'yes' if b['traceback'] else 'no'} | {b['seconds']} | {b['message']} |"
        )
    print(
        f"\ntotal {out['seconds']:.0f} s on {args.threads} threads (load {out['machine']['load_start']:.1f} → {out['load_end']:.1f})"
    )
    for name, s in out["speed"].items():
        print(
            f"{name}: table prediction median error {s['prediction_median_error']:.1%}; "
            + ", ".join(
                f"zipkd {x['target']:g}x measured {x['measured']:.2f}x (predicted {x['predicted']:.2f}x)"
                for x in s["pruned"]
            )
        )
    worst = max(abs(p["rel_diff"]) for p in out["parity"])
    print(
        f"parity: worst perplexity difference {worst:.4%}, greedy identical: {all(p['greedy_equal'] for p in out['parity'])}"
    )
    print(
        f"HEADLINE zipkd 2x Q8_0 decode in llama.cpp = {head['decode_tok_s']:.0f} tok/s = {headline:.1f}x dense torch fp32 "
        f"({rows[0]['decode_tok_s']:.1f} tok/s); target >= {HEADLINE:g}x"
    )
    if misses:
        print("MISSED: " + "; ".join(misses))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
