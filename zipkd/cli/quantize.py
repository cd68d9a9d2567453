"""`zipkd quantize`: bitsandbytes / optimum-quanto weight quantization of any zipkd model folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from zipkd.cli.app import app
from zipkd.cli.common import (
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    ModelArg,
    cli_errors,
    console,
    err_console,
    progress,
)

METHOD_HELP = (
    "bnb-int8, bnb-nf4 (alias nf4), bnb-fp4 (alias fp4), quanto-int8 or quanto-int4. "
    "`--list` shows which run on --device here."
)


def _method(value: str) -> str:
    from zipkd.errors import ZipkdError
    from zipkd.quantize.api import canonical_method

    try:
        return canonical_method(value)
    except ZipkdError as exc:
        raise typer.BadParameter(str(exc)) from None


def _list(device: str, as_json: bool) -> None:
    from zipkd.quantize.api import METHODS, available_methods, backend_problem, device_type

    avail = set(available_methods(device))
    dev = device_type(device)
    rows = [
        {
            "method": m.name,
            "backend": m.backend,
            "weights": m.weights,
            "bits": m.bits,
            "available": m.name in avail,
            "why_not": None if m.name in avail else (backend_problem(m.backend, dev) or f"no {dev} kernels"),
            "summary": m.summary,
        }
        for m in METHODS.values()
    ]
    if as_json:
        console.print_json(json.dumps({"device": device, "methods": rows}))
        return
    table = Table(title=f"Quantization methods on {device}")
    for col in ("method", "backend", "weights", f"on {device}", "what"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["method"],
            r["backend"],
            r["weights"],
            "[green]yes[/]" if r["available"] else f"[red]no[/] ({r['why_not']})",
            r["summary"],
        )
    console.print(table)


@app.command(name="quantize", rich_help_panel="Pipeline")
@cli_errors
def quantize(
    model: ModelArg = "smollm2-135m",
    method: Annotated[str, typer.Option("--method", "-m", help=METHOD_HELP)] = "bnb-nf4",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output folder (written atomically).")
    ] = None,
    device: DeviceOpt = "cpu",
    dtype: Annotated[
        str | None,
        typer.Option(
            help="Dtype of the unquantized parts and of compute: float32, bfloat16, float16 (default float32 on cpu, "
            "bfloat16 on cuda)."
        ),
    ] = None,
    skip: Annotated[
        list[str] | None,
        typer.Option(
            "--skip", help="Linear layers kept in full precision, by name (repeatable; default lm_head)."
        ),
    ] = None,
    measure: Annotated[
        bool,
        typer.Option(
            "--measure/--no-measure",
            help="Time the original and the quantized model alternately (prefill 1 x "
            "--seq-len on --device) and report the ratio, slower or faster.",
        ),
    ] = True,
    seq_len: Annotated[int, typer.Option(help="Prompt length for --measure.")] = 128,
    repeats: Annotated[
        int, typer.Option(help="Timed repeats per model for --measure (median reported).")
    ] = 3,
    list_methods: Annotated[
        bool,
        typer.Option(
            "--list", help="List the methods and whether each runs on --device on this machine, then exit."
        ),
    ] = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Quantize a model's linear layers (embeddings and lm_head stay in full precision) and save it with its
    recipe; `zipkd` commands reload it as quantized. Works on pruned models with per-layer widths."""
    if list_methods:
        _list(device, as_json)
        return
    if output is None:
        raise typer.BadParameter("give an output folder with --output/-o", param_hint="--output")
    if seq_len < 1 or repeats < 1:
        raise typer.BadParameter("--seq-len and --repeats must be at least 1")
    name = _method(method)
    from zipkd.latency.table import Regime
    from zipkd.quantize.api import QuantizeConfig
    from zipkd.quantize.api import quantize as run_quantize

    cfg = QuantizeConfig(method=name, device=device, skip=tuple(skip) if skip else ("lm_head",), dtype=dtype)
    regime = (
        Regime(
            device=device,
            regime="prefill",
            batch=1,
            seq_len=seq_len,
            dtype=cfg.resolved_dtype,
            quantization=name,
        )
        if measure
        else None
    )
    from zipkd.models.io import resolve_model
    from zipkd.outputs import check_output, output_lock

    out = check_output(output, force, (resolve_model(model),))  # before loading anything
    with output_lock(out), progress(transient=True) as bar:
        res = run_quantize(model, cfg, out, force=force, measure=regime, progress=bar, repeats=repeats)
    summary = {
        "output": str(res.out),
        "method": res.method,
        "quantized_linears": res.quantized_linears,
        "tensor_mib_before": res.bytes_before / 2**20,
        "tensor_mib_after": res.bytes_after / 2**20,
        "disk_mib": res.disk_bytes / 2**20,
        "quantize_seconds": res.seconds,
        "latency": res.latency or None,
    }
    if as_json:
        console.print_json(json.dumps(summary))
        return
    console.print(f"[bold]{res.method}[/]: {res.quantized_linears} linear layers quantized → {res.out}")
    console.print(
        f"  weights in memory {summary['tensor_mib_before']:.1f} MiB → {summary['tensor_mib_after']:.1f} MiB"
        f" ({res.bytes_before / max(res.bytes_after, 1):.2f}x smaller); on disk {summary['disk_mib']:.1f} MiB"
    )
    if res.latency:
        lat = res.latency
        verdict = "[green]faster[/]" if lat["speedup"] >= 1 else "[bold red]SLOWER[/]"
        console.print(
            f"  prefill 1x{seq_len} on {device}: {lat['original_ms']:.1f} ms → {lat['quantized_ms']:.1f} ms "
            f"= {lat['speedup']:.2f}x ({verdict} than unquantized; median of {repeats})"
        )
        if res.slower:
            err_console.print(
                "[yellow]note:[/] this quantized model is slower than the original on this device: "
                "it saves memory, not time. Keep it only if memory is the constraint."
            )
