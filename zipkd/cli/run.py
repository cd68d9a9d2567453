"""`zipkd run recipe.yaml`: the whole chain, resumable, with a manifest in every stage folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from zipkd.cli.app import app
from zipkd.cli.common import cli_errors, console, err_console, progress, quiet_lm_eval


def summary_table(report) -> Table:
    """Quality / speed / memory of every evaluated model against the base, one column per model (a family of
    models still fits a terminal)."""
    models = report.all_models()
    t = Table(title="zipkd run: final models against the base")
    t.add_column("")
    for m in models:
        t.add_column("base" if m is report.base else (m.stage or m.name), justify="right")

    def fmt(x, spec="{:.3f}"):
        return "—" if x is None else spec.format(x)

    def mem(m, key, scale, spec):
        v = (m.memory or {}).get(key)
        return fmt(v / scale if v else None, spec)

    t.add_row("model", *[m.name for m in models])
    for task in report.tasks:
        metric = next((m.quality[task].get("metric") for m in models if task in m.quality), None)
        label = f"{task} ({metric})" if metric else task
        t.add_row(label, *[fmt(m.quality.get(task, {}).get("score")) for m in models])
    t.add_row("mean retention", *[fmt(m.mean_retention, "{:.1%}") for m in models])
    t.add_row("perplexity", *[fmt((m.perplexity or {}).get("perplexity"), "{:.2f}") for m in models])
    t.add_row("measured speedup", *[fmt(m.measured_speedup, "{:.2f}x") for m in models])
    t.add_row("predicted speedup", *[fmt(m.predicted_speedup, "{:.2f}x") for m in models])
    t.add_row("parameters (M)", *[mem(m, "params", 1e6, "{:.1f}") for m in models])
    t.add_row("disk MiB", *[mem(m, "disk_bytes", 2**20, "{:.0f}") for m in models])
    return t


def engine_table(torch_report, engine_report) -> Table:
    """The exported GGUF in llama.cpp beside the dense GGUF at the same type and the dense torch model: speed,
    held-out perplexity, task scores and size."""
    base_t = torch_report.base if torch_report is not None else None
    rows = [("dense, torch fp32 eager", base_t, None)] if base_t is not None else []
    q = next((m.engine or {} for m in engine_report.all_models() if m.engine), {}).get("quantization")
    q = (q or "").upper()
    if engine_report.base is not None:
        rows.append((f"dense, llama.cpp {q}", engine_report.base, "llama.cpp"))
    rows += [(f"{m.stage or m.name}, llama.cpp {q}", m, "llama.cpp") for m in engine_report.models]
    t = Table(title="zipkd run: the exported GGUF in llama.cpp, beside the dense models")
    for col in (
        "model",
        "decode tok/s",
        "prefill ms",
        "speedup",
        "perplexity",
        *engine_report.tasks,
        "MiB",
    ):
        t.add_column(col, justify="left" if col == "model" else "right")

    def fmt(x, spec="{:.2f}"):
        return "—" if x is None else spec.format(x)

    treg = (torch_report.regime or {}) if torch_report is not None else {}
    for label, m, runtime in rows:
        speed = m.speed or {}
        regimes = speed.get("regimes") or {}
        if runtime is None:  # torch: only the regime it was measured in
            kind = treg.get("regime")
            regimes = {kind: speed} if kind else {}
        dec = (regimes.get("decode") or {}).get("tokens_per_s") if "decode" in regimes else None
        pre = (regimes.get("prefill") or {}).get("median_ms") if "prefill" in regimes else None
        t.add_row(
            label,
            fmt(dec, "{:.0f}"),
            fmt(pre, "{:.0f}"),
            fmt(m.measured_speedup, "{:.2f}x") if runtime and m is not engine_report.base else "—",
            fmt((m.perplexity or {}).get("perplexity")),
            *[fmt(m.quality.get(task, {}).get("score"), "{:.3f}") for task in engine_report.tasks],
            fmt(
                (m.memory or {}).get("disk_bytes") / 2**20 if (m.memory or {}).get("disk_bytes") else None,
                "{:.0f}",
            ),
        )
    return t


@app.command(rich_help_panel="Pipeline")
@cli_errors
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see zipkd/recipes/ for examples).")],
    from_stage: Annotated[
        str | None,
        typer.Option(
            "--from", help="Rerun from this stage on: profile, prune, recover, quantize, export or eval."
        ),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Override the recipe's output folder.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Write into an existing folder that zipkd did not create (its recipe.yaml is replaced; a stage "
            "folder zipkd did not write is never replaced). Reruns of a zipkd run folder need no --force.",
        ),
    ] = False,
    check: Annotated[bool, typer.Option("--check", help="Only validate the recipe and exit.")] = False,
) -> None:
    """Run a recipe: profile → prune → recover → quantize → export → eval. Each stage writes a folder with its
    manifest; rerunning skips unchanged stages and resumes an interrupted recovery. With `hardware: {runtime:
    llama.cpp}` the latency table, the search and the measured speed are llama.cpp's; an export stage writes the
    GGUF that the eval stage then also scores in llama.cpp."""
    quiet_lm_eval()  # before the stages import lm-eval and tqdm (tqdm reads TQDM_DISABLE on import)
    from zipkd.recipe import load_recipe

    r = load_recipe(recipe)
    if output is not None:
        r.output = output
    if check:
        console.print(f"recipe {recipe} is valid; output {r.output}")
        return
    from zipkd.pipeline import run_recipe

    def on_stage(stage: str, status: str) -> None:
        err_console.print(f"[bold]{stage}[/]: {status}")

    with progress() as bar:
        summary = run_recipe(r, from_stage=from_stage, progress=bar, on_stage=on_stage, force=force)
    if summary.report is not None:
        console.print(summary_table(summary.report))
    if summary.engine_report is not None:
        console.print(engine_table(summary.report, summary.engine_report))
    for s in summary.stages:
        console.print(f"{s.stage:9s} {'skipped' if s.skipped else f'{s.seconds:6.0f} s'}  {s.folder}")
    console.print(f"output: {summary.folder} (each stage folder holds its zipkd.json manifest)")
