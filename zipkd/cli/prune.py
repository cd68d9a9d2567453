"""`zipkd prune`: ZipLM-style structured pruning to measured speedup targets (a thin layer over zipkd.prune)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from typer.core import TyperCommand

from zipkd.cli.app import app
from zipkd.cli.common import (
    REGIME_PANEL,
    BatchOpt,
    ContextOpt,
    DecodeTokensOpt,
    DeviceOpt,
    DtypeOpt,
    ForceOpt,
    JsonOpt,
    ModelArg,
    QuantizationOpt,
    RuntimeOpt,
    SeedOpt,
    SeqLenOpt,
    ThreadsOpt,
    cli_errors,
    console,
    parse_speedups,
    progress,
)

_REGIME = REGIME_PANEL
_CALIB = "Calibration"
_SEARCH = "Method"


class _PruneCommand(TyperCommand):
    """Takes --method's help from the method registry when the help is shown: the registry imports torch,
    which `zipkd --help` must not wait for."""

    def format_help(self, ctx, formatter) -> None:
        from zipkd.prune.methods import method_help

        for param in self.params:
            if param.name == "method":
                param.help = f"Pruning method: {method_help()}."
        super().format_help(ctx, formatter)


def _targets(value: str) -> list[float]:
    targets = parse_speedups(value)
    if not targets:
        raise typer.BadParameter("give at least one target speedup, e.g. 2x or 1.5x,2x,3x")
    if min(targets) == 1.0:
        raise typer.BadParameter(
            "1x is the dense model itself: nothing to prune (give a target above 1x, e.g. 1.5x)",
            param_hint="--target-speedup",
        )
    return targets


def _method(value: str) -> str:
    from zipkd.prune.methods import METHODS

    if value not in METHODS:
        raise typer.BadParameter(f"unknown method {value!r}; choose one of {', '.join(METHODS)}")
    return value


@app.command(name="prune", cls=_PruneCommand, rich_help_panel="Pipeline")
@cli_errors
def prune(
    model: ModelArg = "smollm2-135m",
    target_speedup: Annotated[
        str,
        typer.Option(
            "--target-speedup",
            "-t",
            help="Speedup target(s) on the regime: 2x, 2, 2.0, or a family 1.5x,2x,3x "
            "(one output folder per target, OUT/1.5x, OUT/2x, ...). Always over the unpruned base model, also "
            "when MODEL is pruned already.",
        ),
    ] = "2x",
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Output folder (written atomically).")
    ] = Path("pruned"),
    force: ForceOpt = False,
    table: Annotated[
        Path | None,
        typer.Option(
            help="Latency table file from `zipkd profile -o` (else the cached table, else profiled now).",
            rich_help_panel=_REGIME,
        ),
    ] = None,
    force_table: Annotated[
        bool,
        typer.Option(
            "--force-table",
            help="Accept a --table measured for another model or device.",
            rich_help_panel=_REGIME,
        ),
    ] = False,
    device: DeviceOpt = "cpu",
    regime: Annotated[str, typer.Option(help="prefill or decode.", rich_help_panel=_REGIME)] = "prefill",
    batch: BatchOpt = 1,
    seq_len: SeqLenOpt = 512,
    context: ContextOpt = 512,
    dtype: DtypeOpt = "float32",
    runtime: RuntimeOpt = "eager",
    quantization: QuantizationOpt = None,
    threads: ThreadsOpt = None,
    decode_tokens: DecodeTokensOpt = 64,
    calib: Annotated[
        list[str] | None,
        typer.Option(
            help="Calibration data (.txt, .jsonl, .parquet), repeatable, each FILE or FILE:WEIGHT (a share of "
            "--samples), e.g. --calib docs.txt:0.7 --calib code.jsonl:0.3. Default: zipkd's offline mix of "
            "prose, code, chat and math (40/20/20/20; never evaluation text).",
            rich_help_panel=_CALIB,
            show_default=False,
            metavar="FILE[:WEIGHT]",
        ),
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="Calibration sequences.", rich_help_panel=_CALIB)] = 32,
    calib_len: Annotated[
        int, typer.Option(min=2, help="Tokens per calibration sequence.", rich_help_panel=_CALIB)
    ] = 512,
    damp: Annotated[
        float, typer.Option(help="Hessian damping λ (× mean diagonal).", rich_help_panel=_SEARCH)
    ] = 0.01,
    refit_damp: Annotated[
        float | None,
        typer.Option(
            help="Damping of the re-fit of the kept weights (× mean Hessian diagonal): larger values keep the "
            "update closer to the sliced weights (default: --damp; on development text 0.1 and 1 were worse, "
            "BENCHMARKS.md).",
            rich_help_panel=_SEARCH,
            show_default=False,
        ),
    ] = None,
    method: Annotated[
        str, typer.Option(help="Pruning method (listed in `zipkd prune --help`).", rich_help_panel=_SEARCH)
    ] = "zipkd",
    layout: Annotated[
        str,
        typer.Option(
            help="heterogeneous: each layer keeps its own KV heads and MLP width (the least quality loss for a "
            "target; loads with zipkd and, through `zipkd export`, in llama.cpp). uniform: every kept layer has one "
            "shape and whole layers may be dropped, so the standard config fields describe it and every engine loads it: "
            "stock transformers, vLLM, TensorRT-LLM, SGLang, TGI, llama.cpp's own converter.",
            rich_help_panel=_SEARCH,
        ),
    ] = "heterogeneous",
    error_shrink: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            help="Heterogeneous search: pull each layer's error estimates toward the layers' mean (0 = as "
            "measured on the calibration text, 1 = the same in every layer), a hedge against text unlike the "
            "calibration. Leaving one calibration domain out, 0.5 and 1 made the left-out domain worse, so the "
            "default is 0 (BENCHMARKS.md).",
            rich_help_panel=_SEARCH,
        ),
    ] = 0.0,
    fisher_samples: Annotated[
        int,
        typer.Option(
            min=0,
            help="Calibration sequences whose loss gradients weight the errors across layers (0 = plain "
            "squared output errors).",
            rich_help_panel=_SEARCH,
        ),
    ] = 16,
    seed: SeedOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Prune MODEL to one or more measured speedup targets with structured OBS (ZipLM): per-layer databases of
    KV groups and MLP channels on the latency table's grid, a DP search per target, one output per target.

    MODEL may be one zipkd pruned already, recovered or not: it is then pruned further from its own layer
    shapes (ZipLM's family schedule: prune to 1.5x, recover, prune that to 2x), with --method zipkd or
    wanda-sp, per layer, on the table it was pruned for."""
    from zipkd.cli.common import regime_from_options
    from zipkd.models.io import load_model
    from zipkd.prune import PruneConfig, save_pruned
    from zipkd.prune import prune as run_prune

    targets = _targets(target_speedup)
    method = _method(method)
    if layout not in ("heterogeneous", "uniform"):
        raise typer.BadParameter(
            f"unknown layout {layout!r}; choose heterogeneous or uniform", param_hint="--layout"
        )
    if not 0 < damp < 10:
        raise typer.BadParameter(f"damp must lie in (0, 10) (got {damp})", param_hint="--damp")
    reg = regime_from_options(
        device=device,
        regime=regime,
        batch=batch,
        seq_len=seq_len,
        context=context,
        dtype=dtype,
        runtime=runtime,
        quantization=quantization,
        threads=threads,
        decode_tokens=decode_tokens,
    )
    config = PruneConfig(
        target_speedup=targets,
        method=method,
        samples=samples,
        calib_len=calib_len,
        damp=damp,
        refit_damp=refit_damp,
        seed=seed,
        regime=reg,
        table=str(table) if table else None,
        calib=tuple(calib) if calib else None,
        force_table=force_table,
        fisher_samples=fisher_samples,
        device=device,
        layout=layout,
        error_shrink=error_shrink,
    )
    from zipkd.models.io import resolve_model
    from zipkd.outputs import check_output, output_lock

    src = resolve_model(model)
    out = check_output(
        output, force, (src, *(p for p, _ in config.calib_sources))
    )  # before the expensive part
    from zipkd.prune.api import load_calibration, precheck

    precheck(src, config)  # config.json and the table alone: no weights loaded yet
    texts = load_calibration(config) if config.needs_calibration else None
    with output_lock(out):
        lm = load_model(model, dtype=dtype, device="cpu")
        with progress(transient=True) as bar:
            results = run_prune(lm, config, calib_texts=texts, progress=bar)
            folders = save_pruned(results, lm, out, config, force=force)
    rows = [
        {
            "target": r.target,
            "output": str(f),
            "predicted_speedup": r.predicted_speedup,
            "predicted_ms": r.predicted_ms,
            "dense_predicted_ms": r.dense_ms,
            "error": r.error,
            "layers": sum(1 for s in r.shapes if not s.empty),
            "kv_heads": [s.kv_heads for s in r.shapes],
            "mlp_widths": [s.intermediate for s in r.shapes],
            "layout": r.info.get("layout"),
            "seconds": r.info.get("total_s"),
        }
        for r, f in zip(results, folders, strict=True)
    ]
    if as_json:
        console.print_json(json.dumps({"method": method, "results": rows}, default=str))
        return
    from zipkd.models.surgery import base_geometry

    geo = base_geometry(lm.model.config)
    where = f"llama.cpp {reg.quantization}" if reg.runtime == "llama.cpp" else reg.device
    t = Table(title=f"zipkd prune ({method}) on {where} {reg.regime}", header_style="bold")
    for col in ("target", "predicted", "layout", "layers", "KV heads kept", "MLP channels kept", "output"):
        t.add_column(col, justify="left" if col == "output" else "right")
    for r, row in zip(results, rows, strict=True):
        kv = sum(s.kv_heads for s in r.shapes)
        width = sum(s.intermediate for s in r.shapes)
        t.add_row(
            f"{r.target:g}x",
            f"{r.predicted_speedup:.2f}x",
            str(row["layout"]),
            f"{row['layers']}/{geo.num_layers}",
            f"{kv}/{geo.num_kv_heads * geo.num_layers}",
            f"{width}/{geo.intermediate_size * geo.num_layers}",
            row["output"],
        )
    console.print(t)
