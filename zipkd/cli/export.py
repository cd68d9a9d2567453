"""`zipkd export`: write a model as a GGUF file that llama.cpp runs (a thin layer over zipkd.export)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from zipkd.cli.app import app
from zipkd.cli.common import ForceOpt, JsonOpt, ModelArg, cli_errors, console, progress


@app.command(name="export", rich_help_panel="Pipeline")
@cli_errors
def export(
    model: ModelArg = "smollm2-135m",
    output: Annotated[
        Path, typer.Option("--output", "-o", help="The GGUF file to write (atomically).")
    ] = Path("model.gguf"),
    fmt: Annotated[str, typer.Option("--format", help="Output format: gguf.")] = "gguf",
    quantization: Annotated[
        str,
        typer.Option(
            "--quantization",
            "-q",
            help="GGUF type: f32, f16, bf16 (written as they are) or q8_0, q6_k, q5_k_m, q5_0, q4_k_m, q4_k_s, "
            "q4_0, q3_k_m, q2_k (llama.cpp's own quantizer).",
        ),
    ] = "f32",
    threads: Annotated[
        int | None, typer.Option(min=1, help="Quantizer threads (default: all cores).")
    ] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Export MODEL (dense, pruned — uniform or heterogeneous — or recovered) to GGUF for llama.cpp.

    Uniform layouts are written as their family's own llama.cpp architecture (llama, qwen2, qwen3), so every
    llama.cpp-based engine loads them. Heterogeneous layouts (per-layer heads and widths, removed blocks) are
    written as llama.cpp's `deci` architecture with per-layer arrays. The tokenizer (vocabulary, merges, special
    tokens, chat template) is carried and checked: llama.cpp must tokenize as the Hugging Face tokenizer does.
    Serve the file with `python -m llama_cpp.server --model FILE` or llama.cpp's own tools."""
    from zipkd.export.api import ExportConfig, check_file_output, precheck
    from zipkd.export.api import export as run_export
    from zipkd.models.io import load_model, resolve_model

    config = ExportConfig(format=fmt, quantization=quantization, threads=threads)
    src = resolve_model(model)
    out = check_file_output(output, force, (src,))  # before loading anything
    precheck(src)
    from zipkd.outputs import output_lock

    with output_lock(out), progress(transient=True) as bar:
        lm = load_model(model, dtype="float32", device="cpu")
        bar.add_task(f"exporting {config.quantization} GGUF", total=None)
        result = run_export(lm, config, out, force=force)
    if as_json:
        console.print_json(json.dumps(result.to_json()))
        return
    kinds = {(lay["attn"], lay["mlp"]) for lay in result.layers}
    console.print(
        f"wrote {result.path} ({result.size_bytes / 2**20:.1f} MiB, {result.quantization}, llama.cpp architecture "
        f"{result.arch}, {len(result.layers)} layers{'' if len(kinds) == 1 else ', per-layer shapes'})",
        highlight=False,
    )
    console.print(f"serve it: python -m llama_cpp.server --model {result.path}", highlight=False)
