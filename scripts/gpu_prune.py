"""GPU check of zipkd pruning: an 8B-shaped random-weight Llama (hidden 4096, 32 heads / 8 KV heads, head_dim 128,
MLP 14336, bf16 weights) with 8 decoder layers, pruned to 2x on the GPU with float32 Hessians.

The model lives on the CPU; each layer moves to the GPU only while it is processed (so peak GPU memory is about
one layer plus calibration activations and Hessians). Weights and calibration tokens are random (no model or data
can travel to the GPU machine), so the numbers are about speed and memory, not quality. The latency table is
profiled on the GPU (prefill 1×2048, bf16) when that works, else a FLOP-proportional synthetic table is used (the
JSON says which). Records time per layer (database and re-fit passes), peak GPU memory, predicted and measured
speedup; saves the pruned model, reloads it and compares logits.

    python scripts/gpu_prune.py --out OUT            # on the GPU machine (hard stop at --budget-s, 220 s)
    python scripts/gpu_prune.py --out OUT --smoke    # tiny shapes on CPU, to check the script
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

RESULT: dict = {"ok": False, "stage": "start"}


def _write(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_prune.json").write_text(json.dumps(RESULT, indent=2, default=str) + "\n")


class _Timeout(Exception):
    pass


def _alarm(_sig, _frame):
    raise _Timeout


def flop_table(cfg, seq: int, step: int, device: str):
    """Latency ∝ multiply-adds per token (attention projections + scores, MLP), rest = 5% of dense."""
    from zipkd.latency.table import LatencyTable, Regime

    h, hd, gs = cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    kv, width = cfg.num_key_value_heads, cfg.intermediate_size
    att = {
        k: 0.0 if k == 0 else 1e-6 * k * (h * hd * (gs + 2) + gs * hd * h + seq * gs * hd)
        for k in range(kv + 1)
    }
    widths = sorted({0, width, *range(step, width, step)})
    mlp = {w: 1e-6 * 3 * h * w for w in widths}
    layer = att[kv] + mlp[width]
    rest = 0.05 * cfg.num_hidden_layers * layer / 0.95
    return LatencyTable(
        Regime(device=device, seq_len=seq, dtype="bfloat16"),
        {},
        rest,
        att,
        mlp,
        cfg.num_hidden_layers,
        meta={"synthetic": "flop-proportional"},
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--calib-len", type=int, default=2048)
    ap.add_argument("--fisher-samples", type=int, default=4)
    ap.add_argument("--budget-s", type=int, default=220, help="hard stop (the JSON keeps what was done)")
    ap.add_argument("--no-profile", action="store_true", help="use the synthetic table")
    args = ap.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(args.budget_s)
    t_start = time.perf_counter()
    try:
        run(args, t_start)
        RESULT["ok"] = True
    except _Timeout:
        RESULT["error"] = f"hard stop after {args.budget_s} s at stage {RESULT['stage']}"
    except Exception as exc:  # noqa: BLE001 - report whatever failed
        RESULT["error"] = f"{type(exc).__name__}: {exc}"
        RESULT["traceback"] = traceback.format_exc()[-4000:]
    finally:
        signal.alarm(0)
        RESULT["wall_s"] = round(time.perf_counter() - t_start, 1)
        _write(args.out)
    summary = {
        k: RESULT.get(k)
        for k in (
            "ok",
            "device",
            "table_kind",
            "predicted_speedup",
            "measured_speedup",
            "fisher_s",
            "database_s",
            "surgery_s",
            "peak_gpu_gib_pruning",
            "reload_max_abs_diff",
            "wall_s",
            "error",
        )
    }
    print(json.dumps(summary, indent=1, default=str))
    return 0 if RESULT["ok"] else 1


def run(args, t_start: float) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from zipkd.latency.table import Regime
    from zipkd.models.tiny import LLAMA3_8B
    from zipkd.prune import PruneConfig
    from zipkd.prune.api import _auto_chunk
    from zipkd.prune.driver import apply_choice, build_database, capture_inputs, collect_fisher
    from zipkd.prune.search import select

    cuda = torch.cuda.is_available() and not args.smoke
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    RESULT.update(
        device=torch.cuda.get_device_name(0) if cuda else "cpu",
        torch=torch.__version__,
        random_weights=True,
        random_calibration_tokens=True,
    )
    if args.smoke:
        shape = dict(
            hidden_size=256,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=32,
            intermediate_size=512,
            num_hidden_layers=2,
            vocab_size=1000,
        )
        samples, seq = 4, 128
    else:
        shape = dict(LLAMA3_8B, num_hidden_layers=args.layers)
        samples, seq = args.samples, args.calib_len
    cfg = AutoConfig.for_model("llama", max_position_embeddings=8192, rope_theta=500000.0, **shape)
    RESULT.update(config=shape, calibration={"samples": samples, "seq_len": seq})

    RESULT["stage"] = "build"
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):  # random init is fast on the GPU; the model then lives on the CPU
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.eval()
    RESULT["build_s"] = round(time.perf_counter() - t, 1)

    regime = Regime(
        device=str(device),
        regime="prefill",
        batch=1,
        seq_len=2048 if cuda else 64,
        dtype="bfloat16" if cuda else "float32",
    )
    table = None
    if cuda and not args.no_profile:
        RESULT["stage"] = "profile"
        t = time.perf_counter()
        try:
            from zipkd.latency.profile import profile_model

            table = profile_model(model, regime, repeats=5)
            RESULT["table_kind"] = "profiled"
        except Exception as exc:  # noqa: BLE001 - fall back to a synthetic table, and say so
            RESULT["profile_error"] = f"{type(exc).__name__}: {exc}"
        RESULT["profile_s"] = round(time.perf_counter() - t, 1)
    if table is None:
        table = flop_table(cfg, regime.seq_len, 512 if cuda else 64, str(device))
        RESULT["table_kind"] = "synthetic"
    RESULT["table"] = {
        "dense_ms": table.dense_ms(),
        "rest_ms": table.rest_ms,
        "attention_ms": table.attention_ms,
        "mlp_ms": table.mlp_ms,
    }
    model.to("cpu")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    RESULT["stage"] = "calibrate"
    config = PruneConfig(target_speedup=2.0, samples=samples, calib_len=seq, batch_size=4 if cuda else 2)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (samples, seq), generator=g)

    class Timer:  # a progress-like object recording time per layer
        def __init__(self, sink: list[float]):
            self.sink, self.t = sink, time.perf_counter()

        def add_task(self, *a, **k):
            self.t = time.perf_counter()
            return 0

        def advance(self, *_a, **_k):
            if cuda:
                torch.cuda.synchronize()
            now = time.perf_counter()
            self.sink.append(round(now - self.t, 2))
            self.t = now

    RESULT["stage"] = "fisher"
    t = time.perf_counter()
    fisher_tokens = tokens[: min(samples, args.fisher_samples)]
    fisher = collect_fisher(model, fisher_tokens, config.batch_size, device)
    fisher_layers = [[float(a.trace()), float(m.trace())] for a, m in fisher]
    RESULT.update(
        fisher_s=round(time.perf_counter() - t, 1),
        fisher_tokens=int(fisher_tokens.numel()),
        fisher_traces=fisher_layers,
    )
    if cuda:
        RESULT["peak_gpu_gib_fisher"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)

    RESULT["stage"] = "calibrate"
    t = time.perf_counter()
    acts = capture_inputs(model, tokens, config.batch_size, device)
    first = acts.clone()
    RESULT["capture_s"] = round(time.perf_counter() - t, 1)

    RESULT["stage"] = "database"
    per_layer: list[float] = []
    t = time.perf_counter()
    chunk = _auto_chunk(cfg.intermediate_size)
    db = build_database(
        model,
        acts,
        "zipkd",
        table.attention_levels,
        table.mlp_levels,
        config.damp,
        device,
        chunk,
        fisher=fisher,
        progress=Timer(per_layer),
    )
    RESULT.update(database_s=round(time.perf_counter() - t, 1), database_layer_s=per_layer, mlp_chunk=chunk)
    del acts

    RESULT["stage"] = "search"
    choice = select(db, table, 2.0)
    RESULT.update(
        predicted_speedup=choice.predicted_speedup,
        shapes=[[s.kv_heads, s.intermediate] for s in choice.shapes],
    )

    RESULT["stage"] = "surgery"
    refit_layers: list[float] = []
    t = time.perf_counter()
    pruned = apply_choice(
        model, db, choice.shapes, first, "sequential", config.damp, device, progress=Timer(refit_layers)
    )
    RESULT.update(surgery_s=round(time.perf_counter() - t, 1), surgery_layer_s=refit_layers)
    if cuda:
        RESULT["peak_gpu_gib_pruning"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    RESULT["prune_total_s"] = round(
        RESULT["fisher_s"] + RESULT["capture_s"] + RESULT["database_s"] + RESULT["surgery_s"], 1
    )
    del first, db

    RESULT["stage"] = "save-reload"
    from zipkd.models.io import load_model, save_model

    x = torch.randint(0, cfg.vocab_size, (2, 128), generator=g).to(device)
    pruned.to(device)
    with torch.inference_mode():
        ref = pruned(x).logits.float()
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        out = save_model(
            pruned,
            None,
            Path(tmp) / "pruned",
            stage="prune",
            seed=0,
            extra={"prune": {"layer_shapes": RESULT["shapes"]}},
        )
        RESULT["save_s"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        back = load_model(out, dtype="bfloat16" if cuda else "float32", device=str(device), tokenizer=False)
        RESULT["reload_s"] = round(time.perf_counter() - t, 1)
        with torch.inference_mode():
            got = back.model(x).logits.float()
        RESULT["reload_max_abs_diff"] = float((got - ref).abs().max())
        RESULT["reload_logits_finite"] = bool(torch.isfinite(got).all())
        del back

    if cuda:
        RESULT["stage"] = "measure"
        from zipkd.latency.measure import compare_ms

        model.to(device)
        stats = compare_ms([model, pruned], regime, warmup=3, repeats=9)
        RESULT.update(
            dense_ms=stats[0]["median_ms"],
            pruned_ms=stats[1]["median_ms"],
            measured_speedup=stats[0]["median_ms"] / stats[1]["median_ms"],
        )
    RESULT["stage"] = "done"


if __name__ == "__main__":
    sys.exit(main())
