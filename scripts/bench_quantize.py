"""Benchmark `zipkd quantize` on this CPU: size on disk, weight memory, held-out perplexity and measured latency
for fp32, bf16, bitsandbytes int8/nf4/fp4 and optimum-quanto int8/int4, on the embedded SmolLM2-135M and on a
2x-pruned model (--pruned FOLDER, else zipkd's own 2x prune, else uniform width slicing by weight norm).

Every quantized model is saved by `zipkd.quantize.quantize`, reloaded by `zipkd.models.io.load_model` and checked
to give the same logits as before saving; the reloaded model is the one measured. Latencies: all variants of a
model are timed alternately in one `compare_ms` run (prefill 1x512, and decode of one token on a 512-token
cache), so ratios to fp32 are honest under shared-machine load. Weight memory = bytes of parameters, buffers and
quantization state (not RSS). Prints the headline last; exits 1 if any method fails to run or to reload.

    .venv/bin/python scripts/bench_quantize.py [--tokens 2048] [--repeats 5] [--pruned FOLDER] [--json OUT]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

# On a shared CPU, OpenMP threads spinning while they wait for each other slow everything down by an order of
# magnitude (measured here: decode of one token took seconds); passive waiting keeps the default thread count.
# Set before torch is imported; `--omp-active` keeps OpenMP's default.
if "--omp-active" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

VARIANTS = ("fp32", "bf16", "bnb-int8", "bnb-nf4", "bnb-fp4", "quanto-int8", "quanto-int4")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def second_model(args, work: Path) -> tuple[str, Path]:
    """The model that stands for "2x-pruned": --pruned, else zipkd's own 2x ZipLM prune of SmolLM2 (built by
    zipkd.prune with PruneConfig(target_speedup=2.0), cached; scripts/bench_recover.py caches the same one),
    else uniform width slicing."""
    from zipkd.manifest import read_manifest
    from zipkd.paths import cache_dir

    label = "SmolLM2-135M pruned 2x by zipkd (ZipLM OBS on a CPU prefill table, no recovery)"
    if args.pruned:
        return f"pruned model {args.pruned.name}", args.pruned
    for folder in (
        cache_dir() / "bench_quantize" / "pruned-2x",
        cache_dir() / "bench_recover" / "pruned-2x-zipkd",
    ):
        manifest = read_manifest(folder) or {}
        if manifest.get("stage") == "prune" and manifest.get("config", {}).get("method", "zipkd") == "zipkd":
            return label, folder
    try:
        from zipkd.prune import PruneConfig, prune, save_pruned
    except ImportError:
        log("zipkd.prune is not available: building a uniformly width-sliced model instead")
        return (
            "half-width sliced SmolLM2 (KV 3->2, MLP 1536->768 by weight norm, no recovery)",
            sliced_half_width("smollm2-135m", work / "sliced"),
        )
    from zipkd.models.io import load_model

    log("pruning SmolLM2 to 2x with zipkd.prune (cached for later runs)")
    folder = cache_dir() / "bench_quantize" / "pruned-2x"
    lm = load_model("smollm2-135m")
    cfg = PruneConfig(target_speedup=2.0)
    save_pruned(prune(lm, cfg), lm, folder, cfg, force=True)
    return label, folder


def sliced_half_width(src: str, out: Path) -> Path:
    """Uniform width slicing of every layer: KV groups 3 -> 2 and MLP 1536 -> 768, keeping the structures with
    the largest weight norms (no calibration, no recovery): a stand-in for a 2x-pruned model."""
    from zipkd.models.adapters import adapter_for
    from zipkd.models.io import load_model, save_model
    from zipkd.models.surgery import base_geometry, slice_attention, slice_mlp, sync_config

    lm = load_model(src)
    model = lm.model
    ad = adapter_for(model.config)
    geo = base_geometry(model.config)
    keep_groups = max(1, (2 * geo.num_kv_heads) // 3)
    keep_width = geo.intermediate_size // 2
    for layer in ad.layers(model):
        o = getattr(ad.attention(layer), ad.o).weight.detach()
        group_norm = o.view(o.shape[0], geo.num_kv_heads, -1).norm(dim=(0, 2))
        slice_attention(
            layer, ad, geo.head_dim, geo.group_size, group_norm.topk(keep_groups).indices.tolist()
        )
        mlp = ad.mlp_block(layer)
        score = (
            getattr(mlp, ad.gate).weight.norm(dim=1)
            * getattr(mlp, ad.up).weight.norm(dim=1)
            * getattr(mlp, ad.down).weight.norm(dim=0)
        )
        slice_mlp(layer, ad, score.detach().topk(keep_width).indices)
    sync_config(model)
    model.eval()
    return save_model(model, lm.tokenizer, out, stage="bench-slice", inputs={"model": lm.path}, force=True)


def build_variant(variant: str, src: Path, work: Path, probe: torch.Tensor) -> tuple:
    """Make, save and reload one variant; returns (reloaded model, row). Raises on any failure."""
    from zipkd.models.io import load_model, save_model
    from zipkd.quantize.api import disk_bytes, quantize, tensor_bytes

    t0 = time.perf_counter()
    if variant == "fp32":
        model = load_model(src, tokenizer=False).model
        return model, {"disk_bytes": disk_bytes(src), "tensor_bytes": tensor_bytes(model), "reload": "source"}
    out = work / variant
    if variant == "bf16":
        lm = load_model(src, dtype="bfloat16")
        saved = save_model(lm.model, lm.tokenizer, out, stage="bench-bf16", force=True)
        before = lm.model
    else:
        lm = load_model(src)
        saved = quantize(lm, variant, out, force=True).out
        before = lm.model
    seconds = time.perf_counter() - t0
    back = load_model(saved, dtype="bfloat16" if variant == "bf16" else "float32", tokenizer=False).model
    with torch.inference_mode():
        same = torch.equal(before(probe).logits, back(probe).logits)
    if not same:
        raise RuntimeError(f"{variant}: the reloaded model's logits differ from the model before saving")
    del before, lm
    return back, {
        "disk_bytes": disk_bytes(saved),
        "tensor_bytes": tensor_bytes(back),
        "reload": "identical",
        "make_seconds": seconds,
    }


def bench_family(name: str, src: Path, tok, texts: list[str], args, work: Path) -> dict:
    from zipkd.evaluate.perplexity import perplexity
    from zipkd.latency.measure import compare_ms
    from zipkd.latency.table import Regime

    log(f"== {name}: {src}")
    probe = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    models: dict[str, torch.nn.Module] = {}
    rows: dict[str, dict] = {}
    failures: list[str] = []
    for v in args.methods:
        try:
            model, row = build_variant(v, src, work / name, probe)
            t0 = time.perf_counter()
            row.update(perplexity(model, tok, texts, max_length=512, max_tokens=args.tokens))
            row["ppl_seconds"] = time.perf_counter() - t0
            models[v], rows[v] = model, row
            log(
                f"   {v:12s} ppl {row['perplexity']:8.2f}  disk {row['disk_bytes'] / 2**20:7.1f} MiB  "
                f"weights {row['tensor_bytes'] / 2**20:7.1f} MiB"
            )
        except Exception as exc:  # noqa: BLE001 - a failing method is a result; keep measuring the others
            failures.append(f"{name}/{v}: {type(exc).__name__}: {exc}")
            log(f"   {v:12s} FAILED: {exc}\n{traceback.format_exc()}")
        gc.collect()
    for regime in (
        Regime(regime="prefill", batch=1, seq_len=512),
        Regime(regime="decode", batch=1, context=512),
    ):
        names = list(models)
        try:
            t0 = time.perf_counter()
            stats = compare_ms([models[n] for n in names], regime, warmup=args.warmup, repeats=args.repeats)
            log(f"   {regime.regime} timed in {time.perf_counter() - t0:.0f} s")
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{name}/{regime.regime} timing: {type(exc).__name__}: {exc}")
            log(f"   {regime.regime} timing FAILED: {exc}\n{traceback.format_exc()}")
            continue
        base = stats[names.index("fp32")]["median_ms"] if "fp32" in names else math.nan
        for n, st in zip(names, stats, strict=True):
            rows[n][f"{regime.regime}_ms"] = st["median_ms"]
            rows[n][f"{regime.regime}_p10_ms"] = st["p10_ms"]
            rows[n][f"{regime.regime}_p90_ms"] = st["p90_ms"]
            rows[n][f"{regime.regime}_speed_vs_fp32"] = base / st["median_ms"]
    del models
    gc.collect()
    return {"source": str(src), "rows": rows, "failures": failures}


def table(name: str, fam: dict) -> str:
    rows = fam["rows"]
    ref = rows.get("fp32", {})
    lines = [
        f"**{name}**",
        "",
        "| variant | disk MiB | weights MiB | ppl | ppl vs fp32 | prefill 1x512 ms | vs fp32 | decode ms | vs fp32 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v, r in rows.items():
        ppl_delta = r["perplexity"] / ref["perplexity"] - 1 if ref else math.nan
        lines.append(
            f"| {v} | {r['disk_bytes'] / 2**20:.1f} | {r['tensor_bytes'] / 2**20:.1f} | {r['perplexity']:.2f} | "
            f"{ppl_delta:+.1%} | {r.get('prefill_ms', math.nan):.0f} | "
            f"{r.get('prefill_speed_vs_fp32', math.nan):.2f}x | {r.get('decode_ms', math.nan):.1f} | "
            f"{r.get('decode_speed_vs_fp32', math.nan):.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens scored for perplexity")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per regime (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--pruned", type=Path, help="a zipkd-pruned model folder to use as the second model")
    ap.add_argument("--no-second", action="store_true", help="only the embedded model")
    ap.add_argument("--json", type=Path, help="write all numbers here")
    ap.add_argument("--omp-active", action="store_true", help="keep OpenMP's default (spinning) waits")
    args = ap.parse_args()
    if "fp32" not in args.methods:
        args.methods.insert(0, "fp32")

    from zipkd.data.assets import heldout_text_path
    from zipkd.data.text import load_texts
    from zipkd.manifest import hardware_fingerprint
    from zipkd.models.io import embedded_folder, load_model

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    t_start = time.perf_counter()
    texts = load_texts(heldout_text_path())
    tok = load_model("smollm2-135m").tokenizer
    results: dict = {
        "hardware": hardware_fingerprint(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "families": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_quantize_") as tmp:
        work = Path(tmp)
        families = [("SmolLM2-135M (embedded)", embedded_folder())]
        if not args.no_second:
            families.append(second_model(args, work))
        for name, src in families:
            results["families"][name] = bench_family(name, Path(src), tok, texts, args, work)
    results["seconds"] = time.perf_counter() - t_start
    failures = [f for fam in results["families"].values() for f in fam["failures"]]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    print(
        f"# bench_quantize on {results['hardware']['cpu']} ({results['hardware']['torch_threads']} threads), "
        f"OMP_WAIT_POLICY={results['omp_wait_policy']}, {args.tokens} held-out tokens, {args.repeats} timed rounds, "
        f"{results['seconds']:.0f} s\n"
    )
    for name, fam in results["families"].items():
        print(table(name, fam) + "\n")
    if failures:
        print("FAILURES:\n  " + "\n  ".join(failures))
    base = next(iter(results["families"].values()))["rows"]
    parts = []
    for v in args.methods:
        if v == "fp32" or v not in base:
            continue
        r = base[v]
        parts.append(
            f"{v}: {base['fp32']['tensor_bytes'] / r['tensor_bytes']:.1f}x smaller, ppl "
            f"{r['perplexity'] / base['fp32']['perplexity'] - 1:+.0%}, prefill {r.get('prefill_speed_vs_fp32', math.nan):.2f}x, "
            f"decode {r.get('decode_speed_vs_fp32', math.nan):.2f}x"
        )
    print("HEADLINE (SmolLM2-135M, CPU, vs fp32): " + "; ".join(parts))
    print(
        "HEADLINE: all methods ran and reloaded identically"
        if not failures
        else f"HEADLINE: {len(failures)} failure(s) — see FAILURES above"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
