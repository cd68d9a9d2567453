"""GPU check for `zipkd quantize` (issue #7): the quantization table on a CUDA device for a SmolLM2-135M-shaped
model with random weights (the real model does not travel; its perplexity would be meaningless anyway).

For bf16 (the baseline), fp32, bitsandbytes int8/nf4/fp4 and optimum-quanto int8/int4 it records: size on disk,
weight memory (bytes of parameters, buffers and quantization state), peak CUDA memory of a 1x512 prefill,
quantization error of the logits against the bf16 model (relative L2 and top-1 agreement on random tokens),
whether the saved folder reloads (zipkd.models.io.load_model on cuda) with identical logits, and latency:
prefill 1x512 and decode (one token on a 512-token cache) at batch 1 and 16, every variant timed alternately in
one `compare_ms` run per regime. A back end that is missing is skipped and said so; bitsandbytes and
optimum-quanto can be brought as wheels with `--wheels DIR` (installed offline into a temporary folder).

    python scripts/gpu_quantize.py --out DIR [--wheels DIR] [--budget-s 75]
    python scripts/gpu_quantize.py --out /tmp/gq --smoke        # tiny shapes, CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

T0 = time.perf_counter()
# Most informative first: a short budget drops the tail. fp32 is the bf16 weights upcast (no folder of its own).
# quanto-int4 goes last: on CUDA it may try to compile quanto's extension (it overran a 75 s budget before).
VARIANTS = ("bf16", "bnb-nf4", "bnb-int8", "quanto-int8", "bnb-fp4", "fp32", "quanto-int4")
SMOLLM2_EXTRA = dict(
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0
)  # beside the geometry
TINY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)


def say(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


class Timeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Interrupt a step that runs too long (e.g. a CUDA extension compile) with SIGALRM."""

    def handler(signum, frame):
        raise Timeout(f"step exceeded {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def ensure_backend(module: str, wheels: Path | None, site: Path) -> str | None:
    """Import `module`, installing a wheel from `wheels` (offline, --no-deps) when missing; None or why not."""
    try:
        importlib.import_module(module)
        return None
    except ImportError as exc:
        first = str(exc)
    if wheels is None:
        return f"{module} is not installed ({first}); pass --wheels DIR holding its wheel"
    prefix = {"bitsandbytes": "bitsandbytes-", "optimum.quanto": "optimum_quanto-"}[module]
    found = sorted(wheels.glob(prefix + "*.whl"))
    if not found:
        return f"{module} is not installed and no {prefix}*.whl in {wheels}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        "--target",
        str(site),
        str(found[-1]),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        return f"installing {found[-1].name} failed: {res.stderr.strip()[-300:]}"
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    for name in [m for m in sys.modules if m == "optimum" or m.startswith("optimum.")]:
        del sys.modules[name]  # a namespace package cached before the install
    try:
        importlib.import_module(module)
    except ImportError as exc:
        return f"{module} installed from {found[-1].name} but does not import: {exc}"
    return None


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny model on CPU, to check the script")
    ap.add_argument("--wheels", type=Path, help="folder with bitsandbytes / optimum-quanto wheels")
    ap.add_argument("--budget-s", type=float, default=75.0, help="hard stop for the whole script")
    ap.add_argument("--step-s", type=float, default=25.0, help="limit for making one variant")
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = T0 + args.budget_s
    result: dict = {
        "script": "gpu_quantize",
        "smoke": args.smoke,
        "variants": {},
        "skipped": {},
        "timings": {},
        "errors": [],
    }

    def left() -> float:
        return deadline - time.perf_counter()

    def dump() -> None:
        result["seconds"] = time.perf_counter() - T0
        (args.out / "gpu_quantize.json").write_text(json.dumps(result, indent=2, default=str))

    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        result["errors"].append("no CUDA device")
        dump()
        say("no CUDA device; nothing measured")
        return 1
    result["device"] = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)"
    result["torch"] = torch.__version__
    dtype_name = "float32" if args.smoke else "bfloat16"  # smoke: CPU bf16 4-bit compute is slow
    tmp = Path(tempfile.mkdtemp(prefix="gpu_quantize_"))
    backends = {}
    for mod in ("bitsandbytes", "optimum.quanto"):
        backends[mod] = ensure_backend(mod, args.wheels, tmp / "site")
        say(f"{mod}: {'ok' if backends[mod] is None else 'MISSING - ' + backends[mod]}")
    result["backends"] = {k: v or "ok" for k, v in backends.items()}
    for name in ("bitsandbytes", "optimum-quanto", "transformers"):
        with contextlib.suppress(Exception):
            result.setdefault("versions", {})[name] = importlib.metadata.version(name)

    from transformers import AutoConfig, AutoModelForCausalLM

    from zipkd.latency.measure import compare_ms
    from zipkd.latency.table import Regime
    from zipkd.models.io import LoadedModel, load_model, save_model
    from zipkd.models.tiny import SMOLLM2_135M
    from zipkd.quantize.api import QuantizeConfig, disk_bytes, quantize, tensor_bytes

    torch.manual_seed(0)
    cfg = AutoConfig.for_model("llama", **(TINY if args.smoke else {**SMOLLM2_135M, **SMOLLM2_EXTRA}))
    base = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    src = save_model(base.to(getattr(torch, dtype_name)), None, tmp / "src", stage="gpu-base")
    del base
    say("random model saved")
    reserve = 12.0  # seconds kept for the timings
    seq = 64 if args.smoke else 512
    gen = torch.Generator().manual_seed(1)
    probe = torch.randint(0, cfg.vocab_size, (4, 128 if not args.smoke else 32), generator=gen).to(device)
    models: dict[str, torch.nn.Module] = {}
    ref_logits = None
    for v in VARIANTS:
        if left() < reserve + 8:
            result["skipped"][v] = "time budget"
            continue
        backend = (
            "bitsandbytes" if v.startswith("bnb") else "optimum.quanto" if v.startswith("quanto") else None
        )
        if backend and backends[backend]:
            result["skipped"][v] = backends[backend]
            say(f"{v}: skipped ({backends[backend]})")
            continue
        row: dict = {}
        try:
            with time_limit(min(args.step_s, left() - reserve)):
                t0 = time.perf_counter()
                if v in ("bf16", "fp32"):
                    dt = dtype_name if v == "bf16" else "float32"
                    model = load_model(src, dtype=dt, device=device, tokenizer=False).model
                    row["disk_bytes"] = disk_bytes(src) if dt == dtype_name else None
                    row["reload"] = "source"
                else:
                    lm = load_model(src, dtype=dtype_name, device=device, tokenizer=False)
                    res = quantize(
                        LoadedModel(lm.model, None, src, "random"),
                        QuantizeConfig(v, device=device, dtype=dtype_name),
                        tmp / v,
                        force=True,
                    )
                    model = load_model(res.out, dtype=dtype_name, device=device, tokenizer=False).model
                    with torch.inference_mode():
                        same = torch.equal(lm.model(probe).logits, model(probe).logits)
                    row["disk_bytes"] = res.disk_bytes
                    row["reload"] = "identical" if same else "DIFFERENT"
                    if not same:
                        result["errors"].append(f"{v}: reloaded logits differ")
                    del lm
                row["make_s"] = time.perf_counter() - t0
                row["tensor_bytes"] = tensor_bytes(model)
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    start = torch.cuda.memory_allocated()
                with torch.inference_mode():
                    model(
                        torch.randint(0, cfg.vocab_size, (1, seq), generator=gen).to(device),
                        use_cache=False,
                        logits_to_keep=1,
                    )
                    logits = model(probe).logits
                if device == "cuda":
                    row["prefill_peak_mib"] = (torch.cuda.max_memory_allocated() - start) / 2**20
                    row["allocated_mib"] = torch.cuda.memory_allocated() / 2**20
                if v == "bf16":
                    ref_logits = logits
                if ref_logits is not None:
                    row["logits_rel_err_vs_bf16"] = rel_err(logits, ref_logits)
                    row["top1_agree_vs_bf16"] = (
                        (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
                    )
            models[v] = model
            result["variants"][v] = row
            say(
                f"{v}: ok  disk {(row['disk_bytes'] or 0) / 2**20:.1f} MiB  weights {row['tensor_bytes'] / 2**20:.1f} MiB"
                f"  err {row.get('logits_rel_err_vs_bf16', 0):.4f}  ({row['make_s']:.1f} s)"
            )
        except Exception as exc:  # noqa: BLE001 - one failing variant is a result, not the end
            result["variants"][v] = {"error": f"{type(exc).__name__}: {exc}"}
            result["errors"].append(f"{v}: {type(exc).__name__}: {str(exc)[:300]}")
            say(f"{v}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc(limit=3)
        dump()
    regimes = [
        Regime(device=device, regime="prefill", batch=1, seq_len=seq, dtype=dtype_name),
        Regime(device=device, regime="decode", batch=1, context=seq, dtype=dtype_name),
        Regime(device=device, regime="decode", batch=16, context=seq, dtype=dtype_name),
    ]
    names = list(models)
    for reg in regimes:
        key = f"{reg.regime}_b{reg.batch}"
        if left() < 4 or not names:
            result["skipped"][key] = "time budget" if names else "no models"
            continue
        try:
            repeats = 3 if args.smoke else args.repeats
            with time_limit(left() - 2):
                stats = compare_ms([models[n] for n in names], reg, warmup=2, repeats=repeats)
            base_ms = stats[names.index("bf16")]["median_ms"] if "bf16" in names else float("nan")
            result["timings"][key] = {
                n: {
                    "median_ms": s["median_ms"],
                    "p10_ms": s["p10_ms"],
                    "p90_ms": s["p90_ms"],
                    "speed_vs_bf16": base_ms / s["median_ms"],
                }
                for n, s in zip(names, stats, strict=True)
            }
            say(
                f"{key}: "
                + ", ".join(f"{n} {s['median_ms']:.2f} ms" for n, s in zip(names, stats, strict=True))
            )
        except Exception as exc:  # noqa: BLE001
            result["errors"].append(f"timing {key}: {type(exc).__name__}: {str(exc)[:300]}")
            say(f"timing {key} FAILED: {exc}")
        dump()
    dump()
    # Summary table (bf16 is the baseline: on GPUs that is how such a model is deployed).
    print(f"\n# gpu_quantize on {result['device']} ({result.get('versions', {})}), {result['seconds']:.0f} s")
    print(
        "| variant | disk MiB | weights MiB | prefill peak MiB | logits err vs bf16 | top-1 agree | "
        + " | ".join(f"{k} ms (x bf16)" for k in result["timings"])
        + " |"
    )
    for v, row in result["variants"].items():
        if "error" in row:
            print(f"| {v} | FAILED: {row['error'][:80]} |")
            continue
        disk = "-" if row["disk_bytes"] is None else f"{row['disk_bytes'] / 2**20:.1f}"
        cells = [
            disk,
            f"{row['tensor_bytes'] / 2**20:.1f}",
            f"{row.get('prefill_peak_mib', float('nan')):.0f}",
            f"{row.get('logits_rel_err_vs_bf16', 0):.4f}",
            f"{row.get('top1_agree_vs_bf16', 1):.3f}",
        ]
        for t in result["timings"].values():
            if v in t:
                cells.append(f"{t[v]['median_ms']:.2f} ({t[v]['speed_vs_bf16']:.2f}x)")
        print(f"| {v} | " + " | ".join(cells) + " |")
    for v, why in result["skipped"].items():
        print(f"skipped {v}: {why}")
    print(f"errors: {len(result['errors'])}" + ("".join(f"\n  {e}" for e in result["errors"])))
    return 0 if not result["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
