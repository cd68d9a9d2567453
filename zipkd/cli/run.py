"""`zipkd run recipe.yaml`: the whole chain, resumable, with a manifest in every stage folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from zipkd.cli.app import app
from zipkd.cli.common import cli_errors, console, err_console, progress


def summary_table(report) -> Table:
    """Quality / speed / memory of every evaluated model against the base."""
    t = Table(title="zipkd run: final models against the base")
    for col in (
        "model",
        "stage",
        *report.tasks,
        "mean retention",
        "perplexity",
        "measured speedup",
        "predicted speedup",
        "params",
        "disk MiB",
    ):
        t.add_column(col, justify="left" if col in ("model", "stage") else "right")

    def fmt(x, spec="{:.3f}"):
        return "—" if x is None else spec.format(x)

    for m in report.all_models():
        ppl = (m.perplexity or {}).get("perplexity")
        disk = (m.memory or {}).get("disk_bytes")
        t.add_row(
            m.name,
            m.stage or ("base" if m is report.base else ""),
            *[fmt(m.quality.get(task, {}).get("score")) for task in report.tasks],
            fmt(m.mean_retention, "{:.1%}"),
            fmt(ppl, "{:.2f}"),
            fmt(m.measured_speedup, "{:.2f}x"),
            fmt(m.predicted_speedup, "{:.2f}x"),
            fmt((m.memory or {}).get("params"), "{:,}"),
            fmt(disk / 2**20 if disk else None, "{:.0f}"),
        )
    return t


@app.command(rich_help_panel="Pipeline")
@cli_errors
def run(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML (see zipkd/recipes/ for examples).")],
    from_stage: Annotated[
        str | None,
        typer.Option("--from", help="Rerun from this stage on: profile, prune, recover, quantize or eval."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Override the recipe's output folder.")
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Accepted for symmetry; reruns are incremental anyway (stages whose inputs and config match are skipped).",
        ),
    ] = False,
    check: Annotated[bool, typer.Option("--check", help="Only validate the recipe and exit.")] = False,
) -> None:
    """Run a recipe: profile → prune → recover → quantize → eval. Each stage writes a folder with its manifest;
    rerunning skips unchanged stages and resumes an interrupted recovery."""
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
        summary = run_recipe(r, from_stage=from_stage, progress=bar, on_stage=on_stage)
    if summary.report is not None:
        console.print(summary_table(summary.report))
    for s in summary.stages:
        console.print(f"{s.stage:9s} {'skipped' if s.skipped else f'{s.seconds:6.0f} s'}  {s.folder}")
    console.print(f"output: {summary.folder} (each stage folder holds its zipkd.json manifest)")
