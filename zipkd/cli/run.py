"""`zipkd run recipe.yaml`: the whole chain, resumable, with a manifest in every stage folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from zipkd.cli.app import app
from zipkd.cli.common import cli_errors, console, err_console, progress


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
