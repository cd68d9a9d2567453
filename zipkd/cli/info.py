"""`zipkd info` and `zipkd setup`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from zipkd.cli.app import app
from zipkd.cli.common import DtypeOpt, JsonOpt, ModelArg, cli_errors, console, progress


def describe(lm) -> dict:
    """Architecture summary of a loaded model (what `zipkd info` prints)."""
    from zipkd.models.adapters import adapter_for
    from zipkd.models.surgery import base_geometry, is_heterogeneous, layer_shapes

    cfg = lm.model.config
    adapter_for(cfg)
    geo = base_geometry(cfg)
    shapes = layer_shapes(lm.model)
    params = sum(p.numel() for p in lm.model.parameters())
    return {
        "model": lm.name,
        "path": str(lm.path),
        "architecture": cfg.model_type,
        "parameters": params,
        "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch."),
        "hidden_size": geo.hidden_size,
        "layers": len(shapes),
        "base_layers": geo.num_layers if getattr(cfg, "zipkd_base", None) else len(shapes),
        "heads": geo.num_heads,
        "kv_heads": geo.num_kv_heads,
        "head_dim": geo.head_dim,
        "intermediate_size": geo.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "tie_word_embeddings": bool(getattr(cfg, "tie_word_embeddings", False)),
        "layout": _layout(cfg, is_heterogeneous(cfg)),
        "layer_shapes": [
            {"kv_heads": s.kv_heads, "heads": s.heads(geo.group_size), "intermediate": s.intermediate}
            for s in shapes
        ],
    }


def _layout(cfg, heterogeneous: bool) -> str:
    if heterogeneous:
        return "heterogeneous (per-layer shapes: zipkd's loader, llama.cpp through `zipkd export`)"
    if getattr(cfg, "zipkd_base", None):
        return "uniform (standard config fields: stock transformers and every serving engine load it)"
    return "dense"


def _runs(shapes: list[dict]) -> list[tuple[int, int, dict]]:
    runs: list[tuple[int, int, dict]] = []
    for i, s in enumerate(shapes):
        if runs and runs[-1][2] == s:
            runs[-1] = (runs[-1][0], i, s)
        else:
            runs.append((i, i, s))
    return runs


@app.command(rich_help_panel="Inspect")
@cli_errors
def info(
    model: ModelArg = "smollm2-135m",
    ppl: Annotated[bool, typer.Option("--ppl", help="Also measure perplexity on held-out text.")] = False,
    data: Annotated[
        Path | None,
        typer.Option(help="Text for --ppl (.txt/.jsonl/.parquet); default: held-out LAMBADA passages."),
    ] = None,
    max_length: Annotated[int, typer.Option(help="Window length for --ppl.")] = 512,
    max_tokens: Annotated[int, typer.Option(help="Tokens scored for --ppl.")] = 16384,
    dtype: DtypeOpt = "float32",
    as_json: JsonOpt = False,
) -> None:
    """Print a model's architecture, parameter count and per-layer shapes (and perplexity with --ppl)."""
    from zipkd.models.io import load_model

    if max_length < 2 or max_tokens < 2:
        raise typer.BadParameter("--max-length and --max-tokens must be at least 2")
    lm = load_model(model, dtype=dtype, tokenizer=ppl)
    summary = describe(lm)
    if ppl:
        from zipkd.data.assets import heldout_text_path
        from zipkd.data.text import load_texts
        from zipkd.evaluate.perplexity import perplexity

        source = data or heldout_text_path()
        with progress(transient=True) as bar:
            summary["perplexity"] = perplexity(
                lm.model,
                lm.tokenizer,
                load_texts(source),
                max_length=max_length,
                max_tokens=max_tokens,
                progress=bar,
            )
        summary["perplexity"]["data"] = str(source)
    if as_json:
        console.print_json(json.dumps(summary))
        return
    t = Table(title=f"{summary['model']} ({summary['architecture']})", show_header=False)
    for key in (
        "path",
        "parameters",
        "dtype",
        "hidden_size",
        "layers",
        "heads",
        "kv_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
        "tie_word_embeddings",
        "layout",
    ):
        val = summary[key]
        t.add_row(key, f"{val:,}" if isinstance(val, int) and not isinstance(val, bool) else str(val))
    console.print(t)
    lt = Table(title="Per-layer shapes")
    for col in ("layers", "KV heads", "query heads", "MLP width"):
        lt.add_column(col, justify="right")
    for a, b, s in _runs(summary["layer_shapes"]):
        lt.add_row(
            f"{a}" if a == b else f"{a}–{b}",
            str(s["kv_heads"] or "removed"),
            str(s["heads"] or "—"),
            str(s["intermediate"] or "removed"),
        )
    console.print(lt)
    if ppl:
        p = summary["perplexity"]
        console.print(
            f"perplexity [bold]{p['perplexity']:.2f}[/] on {p['tokens']:,} tokens "
            f"({p['max_length']}-token windows) of {p['data']}"
        )


@app.command(rich_help_panel="Inspect")
@cli_errors
def setup() -> None:
    """Prepare the offline assets: convert the embedded model and export the local data (run once)."""
    from zipkd.data.assets import ensure_data
    from zipkd.models.embedded import DEFAULT_MODEL
    from zipkd.models.io import embedded_folder

    with console.status("converting the embedded model (once)…"):
        folder = embedded_folder(DEFAULT_MODEL)
    with console.status("exporting offline data (once)…"):
        data = ensure_data()
    console.print(f"model {DEFAULT_MODEL}: {folder}")
    console.print(f"data: {data}")
