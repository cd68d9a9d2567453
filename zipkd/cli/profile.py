"""`zipkd profile`: measure (or reuse) a latency table for a model on a device and regime, and validate it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from zipkd.cli.app import app
from zipkd.cli.common import (
    REGIME_PANEL,
    BatchOpt,
    ContextOpt,
    DecodeTokensOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelArg,
    QuantizationOpt,
    RuntimeOpt,
    SeqLenOpt,
    ThreadsOpt,
    cli_errors,
    console,
    progress,
)

_REGIME = REGIME_PANEL
_RUN = "Run"


@app.command(name="profile", rich_help_panel="Pipeline")
@cli_errors
def profile(
    model: ModelArg = "smollm2-135m",
    device: DeviceOpt = "cpu",
    regime: Annotated[
        str,
        typer.Option(
            help="prefill (prompt of --seq-len tokens) or decode (one token over a "
            "KV cache of --context tokens).",
            rich_help_panel=_REGIME,
        ),
    ] = "prefill",
    batch: BatchOpt = 1,
    seq_len: SeqLenOpt = 512,
    context: ContextOpt = 512,
    dtype: DtypeOpt = "float32",
    runtime: RuntimeOpt = "eager",
    quantization: QuantizationOpt = None,
    threads: ThreadsOpt = None,
    decode_tokens: DecodeTokensOpt = 64,
    method: Annotated[
        str,
        typer.Option(
            help="How blocks are timed: auto (blocks on CPU; on a GPU anchored for prefill, in-model for "
            "decode), blocks (each block alone), anchored (inside the dense layer) or in-model (whole models "
            "whose every layer has the shape; slowest, sees launch overlap). Tables of a non-default method are "
            "cached apart: pass them to `zipkd prune --table`.",
            rich_help_panel=_RUN,
        ),
    ] = "auto",
    table: Annotated[
        Path | None,
        typer.Option(
            help="Use this table file instead of measuring (checked against the model and device).",
            rich_help_panel=_RUN,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Also write the table to this JSON file.", rich_help_panel=_RUN),
    ] = None,
    validate: Annotated[
        bool,
        typer.Option(
            "--validate",
            help="Measure random pruned variants (--variants of them) end to end and compare with the predictions.",
            rich_help_panel=_RUN,
        ),
    ] = False,
    variants: Annotated[
        int,
        typer.Option(
            min=1, help="Variants for --validate (speedups spread over 1.2x-3x).", rich_help_panel=_RUN
        ),
    ] = 8,
    repeats: Annotated[
        int, typer.Option(min=1, help="Timed repeats per entry (median).", rich_help_panel=_RUN)
    ] = 9,
    seed: Annotated[
        int, typer.Option(help="Seed of the random variants for --validate.", rich_help_panel=_RUN)
    ] = 0,
    remeasure: Annotated[
        bool,
        typer.Option(
            "--remeasure",
            help="Measure again even when a cached table exists (it is replaced).",
            rich_help_panel=_RUN,
        ),
    ] = False,
    force_table: Annotated[
        bool,
        typer.Option(
            "--force-table",
            help="Accept a --table measured for another device, or another model of the same shape.",
            rich_help_panel=_RUN,
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing --output file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Measure a latency table: every attention KV-head count and a grid of MLP widths (0 = block removed),
    plus the rest, on the target device and regime. Cached and reused (--remeasure measures again)."""
    from zipkd.cli.common import regime_from_options
    from zipkd.latency.profile import METHODS, load_or_profile, parse_device
    from zipkd.latency.runtimes import runtime_for
    from zipkd.models.io import load_model

    if method != "auto" and method not in METHODS:
        raise typer.BadParameter(
            f"unknown method {method!r}; choose auto, {', '.join(METHODS)}", param_hint="--method"
        )
    how = None if method == "auto" else method
    if output is not None:
        from zipkd.outputs import check_output

        output = check_output(output, force, (table,) if table else (), kind="file")
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
    engine = not runtime_for(reg.runtime).torch
    dev = parse_device(device) if (table is None or validate) and not engine else None
    if table is not None:  # checked against config.json before any weights load
        from types import SimpleNamespace

        from zipkd.latency.profile import check_table_config
        from zipkd.latency.table import LatencyTable
        from zipkd.models.io import read_config, resolve_model

        src = resolve_model(model)
        if src.is_dir():
            check_table_config(
                LatencyTable.load(table), SimpleNamespace(**read_config(src)), reg, force_table
            )
    lm = load_model(model, dtype=dtype, device=str(dev or "cpu"), tokenizer=engine)
    with progress(transient=True) as bar:
        tab = load_or_profile(
            lm,
            reg,
            table=table,
            accept_mismatch=force_table,
            progress=bar,
            method=how,
            repeats=repeats,
            remeasure=remeasure,
        )
        report = None
        if validate and engine:
            report = (
                runtime_for(reg.runtime)
                .impl()
                .validate(lm, tab, n=variants, seed=seed, repeats=max(3, min(repeats, 5)), progress=bar)
            )
        elif validate:
            from zipkd.latency.validate import validate_table

            report = validate_table(lm, tab, n=variants, seed=seed, repeats=max(3, repeats - 2), progress=bar)
    if output is not None:
        from zipkd.outputs import output_lock

        with output_lock(output):
            tab.save(output)
    if as_json:
        out = {"table": tab.to_json()}
        if report is not None:
            out["validation"] = report.to_json()
        console.print_json(json.dumps(out))
        return
    _print_table(tab)
    if report is not None:
        _print_validation(report)


def _print_table(tab) -> None:
    r = tab.regime
    what = (
        f"{r.batch}×{r.seq_len} prefill"
        if r.regime == "prefill"
        else f"decode, batch {r.batch}, context {r.context}"
    )
    fp = tab.fingerprint
    console.print(
        f"[bold]Latency table[/] {fp.get('architecture')} on {fp.get('device_name')} ({r.device}, {r.dtype}, "
        f"{r.runtime}{', ' + r.quantization if r.quantization else ''}), {what}"
    )
    t = Table(show_header=True, header_style="bold")
    t.add_column("block")
    t.add_column("level", justify="right")
    t.add_column("ms", justify="right")
    for k, v in sorted(tab.attention_ms.items()):
        t.add_row("attention", f"{k} KV heads", f"{v:.3f}")
    mlp = sorted(tab.mlp_ms.items())
    every = max(1, len(mlp) // 10)
    shown = [x for i, x in enumerate(mlp) if i % every == 0 or i == len(mlp) - 1]
    for w, v in shown:
        t.add_row("mlp", f"width {w}", f"{v:.3f}")
    t.add_row("rest", "embeddings, norm, lm_head, overheads", f"{tab.rest_ms:.3f}")
    t.add_row("layer overhead", "half in each kept block (see docs)", f"{tab.layer_overhead_ms:.3f}")
    console.print(t)
    if len(shown) < len(mlp):
        console.print(f"({len(mlp)} MLP widths measured; --json or --output for all)")
    line = f"dense: predicted {tab.dense_ms():.2f} ms"
    if tab.measured_dense_ms is not None:
        line += f", measured {tab.measured_dense_ms:.2f} ms"
    if tab.meta.get("method"):
        line += f"; method {tab.meta['method']}"
    if "build_s" in tab.meta and not tab.meta.get("cached"):
        line += f"; built in {tab.meta['build_s']:.0f} s"
    if tab.meta.get("cached"):
        line += " (cached table)"
    console.print(line)
    if tab.meta.get("cache_path"):
        console.print(f"table: {tab.meta['cache_path']}", highlight=False)
    if tab.meta.get("warning"):
        console.print(f"[yellow]warning:[/] {tab.meta['warning']}")


def _print_validation(report) -> None:
    t = Table(title="predicted vs measured (random pruned variants)", header_style="bold")
    for col in ("#", "layers", "pred ms", "meas ms", "pred speedup", "meas speedup", "error"):
        t.add_column(col, justify="right")
    for i, v in enumerate(report.variants):
        t.add_row(
            str(i + 1),
            str(len(v.shapes)),
            f"{v.predicted_ms:.2f}",
            f"{v.measured_ms:.2f}",
            f"{v.predicted_speedup:.2f}x",
            f"{v.measured_speedup:.2f}x",
            f"{v.speedup_error:+.1%}",
        )
    console.print(t)
    console.print(
        f"median |predicted/measured speedup − 1| = {report.median_abs_speedup_error:.1%}; "
        f"latency: {report.median_abs_latency_error:.1%}"
    )
