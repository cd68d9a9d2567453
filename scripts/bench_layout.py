"""Bench: what portability costs. zipkd's `--layout uniform` (one KV-group count and MLP width in every kept
layer, whole layers dropped: the standard config fields describe it, so every engine loads it) against the
heterogeneous default, SmolLM2-135M at 1.5x and 2x, both searched on one CPU prefill 1×512 fp32 table from one
database (same calibration, seed and re-fit).

For each model:
- predicted and measured speedup in torch eager (each pruned model timed alternately with the dense one);
- perplexity on the five held-out domains of `zipkd.data.assets.heldout_domains()` and their geometric-mean
  ratio to dense;
- speed in llama.cpp: a Q8_0 GGUF from `zipkd export`, decode tok/s (64 tokens after a 128-token prompt) and
  prefill 1×512, round-robin against the dense Q8_0 GGUF (2 threads).

The uniform 2x model is saved and then loaded by stock `AutoModelForCausalLM.from_pretrained` (no zipkd code;
logits must equal zipkd's loader's), and converted by llama.cpp's own `convert_hf_to_gguf.py` (taken from the
llama-cpp-python source distribution, which pip fetches into its cache): that GGUF must load in llama.cpp with
the held-out perplexity of zipkd's own F32 export (≤ 0.1% apart) and the same greedy continuation.

Targets: the uniform 2x model measures within ±10% of 2x in torch prefill; stock loading is exact; the standard
converter's file matches. Headline figures are printed last; exit 1 on a miss.

    .venv/bin/python scripts/bench_layout.py [--json out.json] [--samples 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

if "--omp-active" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_prune.py

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import add_bench_args, bench_config, bench_regime, domain_texts, geomean_ratio, scorer  # noqa: E402

TARGETS = (1.5, 2.0)
LAYOUTS = ("heterogeneous", "uniform")
SPEED_TOL = 0.10
PARITY_PPL = 0.001
CACHE = Path(os.environ.get("ZIPKD_CACHE", Path.home() / ".cache" / "zipkd"))


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def llamacpp_converter() -> Path:
    """llama.cpp's `convert_hf_to_gguf.py` with the `conversion` and `gguf-py` packages it imports, from the
    source distribution of the installed llama-cpp-python (pip downloads it once; both are cached)."""
    from importlib.metadata import version

    ver = version("llama_cpp_python")
    dest = CACHE / f"llama.cpp-converter-{ver}"
    script = dest / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", f"llama-cpp-python=={ver}"]
        cmd += ["--no-deps", "--no-binary", ":all:", "-d", tmp, "-q"]
        subprocess.run(cmd, check=True, capture_output=True)
        (sdist,) = Path(tmp).glob("*.tar.gz")
        prefix = f"{sdist.name.removesuffix('.tar.gz')}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        CACHE.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=CACHE))
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name.removeprefix(prefix)
                if m.name.startswith(prefix) and rel.startswith(wanted) and (m.isfile() or m.isdir()):
                    m.name = rel
                    members.append(m)
            tar.extractall(staging, members=members, filter="data")
        staging.rename(dest)
    return script


def convert_with_llamacpp(folder: Path, out: Path) -> Path:
    script = llamacpp_converter()
    cmd = [sys.executable, str(script), str(folder), "--outtype", "f32", "--outfile", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py failed:\n{proc.stderr[-2000:]}")
    return out


def llamacpp_speed(files: dict[str, Path], threads: int, repeats: int) -> dict[str, dict[str, float]]:
    """Decode ms/token and prefill ms of every file, round-robin, in a child process with OpenMP's default wait
    policy: llama.cpp's decode step is hundreds of tiny ops, and passive OpenMP threads (set here for torch)
    would sleep and wake between each (decode ran at a third of its speed)."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    cmd = [
        sys.executable,
        __file__,
        "--omp-active",
        "--time-gguf",
        json.dumps({k: str(v) for k, v in files.items()}),
    ]
    cmd += ["--threads", str(threads), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"llama.cpp timing failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _time_gguf(files: dict[str, str], threads: int, repeats: int) -> dict[str, dict[str, float]]:
    from zipkd.runtimes.llamacpp import compare, open_model, timer

    names = list(files)
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for regime, n_ctx in (("decode", 128 + 64 + 8), ("prefill", 520)):
        models = [open_model(files[n], threads=threads, n_ctx=n_ctx) for n in names]
        try:
            samples = compare(models, timer(regime, seq_len=512, context=128, tokens=64), repeats=repeats)
        finally:
            for m in models:
                m.close()
        for n, s in zip(names, samples, strict=True):
            out[n][f"{regime}_ms"] = statistics.median(s)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_args(ap)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--time-gguf", default=None, help=argparse.SUPPRESS)  # the llama.cpp timing child
    args = ap.parse_args()
    if args.time_gguf:
        print(json.dumps(_time_gguf(json.loads(args.time_gguf), args.threads, args.repeats)))
        return 0

    import torch

    from zipkd.export.api import ExportConfig, export
    from zipkd.latency.measure import compare_ms
    from zipkd.models.io import LoadedModel, load_model, save_model
    from zipkd.prune.api import build, latency_table, layout_of, select_structure
    from zipkd.prune.driver import apply_choice

    t_bench = time.perf_counter()
    regime = bench_regime()
    lm = load_model(args.model)
    table = latency_table(lm, bench_config(args, regime, table=args.table))
    work = Path(tempfile.mkdtemp(prefix="zipkd-bench-layout-"))
    score = scorer(lm, domain_texts("heldout"), args.ppl_tokens)
    _log("dense perplexity")
    dense_ppl = score(lm.model)

    config = bench_config(args, regime)
    t0 = time.perf_counter()
    db, first = build(lm, config, table)
    _log(f"database in {time.perf_counter() - t0:.0f} s")
    rows: list[dict] = []
    models: dict[str, LoadedModel] = {}
    for layout in LAYOUTS:
        for t in TARGETS:
            choice = select_structure(db, table, t, bench_config(args, regime, layout=layout))
            model = apply_choice(lm.model, db, choice.shapes, first.clone(), "sequential", config.update_damp)
            model.eval()
            name = f"{layout} {t:g}x"
            models[name] = LoadedModel(model, lm.tokenizer, lm.path, name)
            kept = [s for s in choice.shapes if not s.empty]
            st = compare_ms([lm.model, model], regime, warmup=2, repeats=args.repeats)
            ppl = score(model)
            rows.append(
                {
                    "layout": layout,
                    "written_as": layout_of(choice.shapes),
                    "target": t,
                    "predicted_speedup": choice.predicted_speedup,
                    "measured_speedup": st[0]["median_ms"] / st[1]["median_ms"],
                    "layers": len(kept),
                    "kv_heads": sorted({s.kv_heads for s in kept}),
                    "mlp_widths": sorted({s.intermediate for s in kept}),
                    "search_error": choice.error,
                    "perplexity": ppl,
                    "geomean_ratio": geomean_ratio(ppl, dense_ppl),
                }
            )
            _log(f"{name}: {rows[-1]}")
    del db, first

    # llama.cpp: every model exported to Q8_0 by zipkd, timed against the dense Q8_0.
    _log("llama.cpp: export to Q8_0 and time")
    files = {"dense": work / "dense-q8_0.gguf"}
    export(lm, ExportConfig(quantization="q8_0"), files["dense"])
    for name, m in models.items():
        files[name] = work / f"{name.replace(' ', '-')}-q8_0.gguf"
        export(m, ExportConfig(quantization="q8_0"), files[name])
    speed = llamacpp_speed(files, args.threads, args.repeats)
    for r in rows:
        s, d = speed[f"{r['layout']} {r['target']:g}x"], speed["dense"]
        r["llamacpp_decode_tok_s"] = 1e3 / s["decode_ms"]
        r["llamacpp_decode_speedup"] = d["decode_ms"] / s["decode_ms"]
        r["llamacpp_prefill_speedup"] = d["prefill_ms"] / s["prefill_ms"]
    dense_decode_tok_s = 1e3 / speed["dense"]["decode_ms"]

    # Portability of the uniform 2x model: stock transformers, llama.cpp's own converter.
    _log("uniform 2x: stock from_pretrained and llama.cpp's converter")
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_llamacpp import engine_greedy, engine_ppl, heldout_windows

    u2 = models["uniform 2x"]
    folder = save_model(u2.model, lm.tokenizer, work / "uniform-2x", stage="prune")
    stock = AutoModelForCausalLM.from_pretrained(folder)
    ours = load_model(folder, tokenizer=False).model
    x = torch.tensor([heldout_windows(lm.tokenizer, 512)[0]])
    with torch.inference_mode():
        stock_exact = bool(torch.equal(stock(x).logits, ours(x).logits))
    del stock, ours
    windows = heldout_windows(lm.tokenizer, 4096)
    zipkd_f32 = work / "uniform-2x-zipkd-f32.gguf"
    export(u2, ExportConfig(quantization="f32"), zipkd_f32)
    converter: dict = {}
    try:
        std_f32 = convert_with_llamacpp(folder, work / "uniform-2x-llamacpp-f32.gguf")
        from zipkd.models.gguf_file import gguf_header

        ppl_std = engine_ppl(std_f32, windows, args.threads)
        ppl_ours = engine_ppl(zipkd_f32, windows, args.threads)
        prompt = windows[0][:64]
        converter = {
            "architecture": gguf_header(std_f32)["fields"].get("general.architecture"),
            "ppl_llamacpp_converter": ppl_std,
            "ppl_zipkd_export": ppl_ours,
            "rel_diff": abs(ppl_std / ppl_ours - 1),
            "greedy_equal": engine_greedy(std_f32, prompt, 32, args.threads)
            == engine_greedy(zipkd_f32, prompt, 32, args.threads),
        }
    except (RuntimeError, subprocess.CalledProcessError, OSError) as exc:
        converter = {"error": str(exc)[-500:]}
    _log(f"converter: {converter}")

    misses: list[str] = []
    u = next(r for r in rows if r["layout"] == "uniform" and r["target"] == 2.0)
    if abs(u["measured_speedup"] / 2.0 - 1) > SPEED_TOL:
        misses.append(
            f"uniform 2x measured {u['measured_speedup']:.2f}x in torch prefill, not within ±10% of 2x"
        )
    if any(r["layout"] == "uniform" and r["written_as"] != "uniform" for r in rows):
        misses.append("a uniform-layout result is not uniform")
    if not stock_exact:
        misses.append("stock from_pretrained logits differ from zipkd's loader")
    if "error" in converter:
        misses.append("llama.cpp's convert_hf_to_gguf.py failed on the uniform model")
    elif converter["rel_diff"] > PARITY_PPL or not converter["greedy_equal"]:
        misses.append("llama.cpp's converter output does not match zipkd's export")
    result = {
        "machine": {
            "cpu": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "llamacpp_threads": args.threads,
        },
        "table": {"path": table.meta.get("cache_path"), "dense_ms": table.dense_ms()},
        "dense_perplexity": dense_ppl,
        "dense_llamacpp_decode_tok_s": dense_decode_tok_s,
        "rows": rows,
        "stock_from_pretrained_exact": stock_exact,
        "llamacpp_converter": converter,
        "misses": misses,
        "bench_s": round(time.perf_counter() - t_bench, 1),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    names = list(dense_ppl)
    print(
        f"\nSmolLM2-135M, zipkd at 1.5x and 2x, both layouts from one database (CPU prefill 1x512 fp32 table); "
        f"held-out perplexity, {args.ppl_tokens} tokens per domain; llama.cpp Q8_0, {args.threads} threads "
        f"(dense {dense_decode_tok_s:.0f} tok/s decode)"
    )
    print(
        f"{'layout':<14} {'target':>6} {'layers':>6} {'torch pred/meas':>16} {'llama.cpp dec/pre':>18} "
        + " ".join(f"{n:>9}" for n in names)
        + "  geomean×"
    )
    print(
        f"{'dense':<14} {'-':>6} {30:>6} {'-':>16} {'-':>18} "
        + " ".join(f"{dense_ppl[n]:>9.2f}" for n in names)
    )
    for r in rows:
        print(
            f"{r['layout']:<14} {r['target']:>5g}x {r['layers']:>6} "
            f"{r['predicted_speedup']:>7.2f}x/{r['measured_speedup']:.2f}x "
            f"{r['llamacpp_decode_speedup']:>9.2f}x/{r['llamacpp_prefill_speedup']:.2f}x "
            + " ".join(f"{r['perplexity'][n]:>9.2f}" for n in names)
            + f"  {r['geomean_ratio']:>7.2f}"
        )
    if "error" not in converter:
        print(
            f"uniform 2x: stock from_pretrained logits identical: {stock_exact}; llama.cpp's convert_hf_to_gguf.py "
            f"→ {converter['architecture']}, perplexity {converter['ppl_llamacpp_converter']:.3f} vs zipkd export "
            f"{converter['ppl_zipkd_export']:.3f}, greedy equal: {converter['greedy_equal']}"
        )
    for t in TARGETS:
        h = next(r for r in rows if r["layout"] == "heterogeneous" and r["target"] == t)
        u = next(r for r in rows if r["layout"] == "uniform" and r["target"] == t)
        print(
            f"{t:g}x: uniform costs {u['geomean_ratio'] / h['geomean_ratio']:.2f}x the heterogeneous geomean "
            f"perplexity ratio; measured torch {u['measured_speedup']:.2f}x vs {h['measured_speedup']:.2f}x, "
            f"llama.cpp decode {u['llamacpp_decode_speedup']:.2f}x vs {h['llamacpp_decode_speedup']:.2f}x"
        )
    print("MISSES: " + "; ".join(misses) if misses else "all targets met")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
