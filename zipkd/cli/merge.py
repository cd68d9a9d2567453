"""`zipkd merge A B --slerp t -o OUT`: SLERP merge of two models with identical shapes."""

from __future__ import annotations

from typing import Annotated

import typer

from zipkd.cli.app import app
from zipkd.cli.common import ForceOpt, OutputOpt, cli_errors, console


@app.command(rich_help_panel="Pipeline")
@cli_errors
def merge(
    model_a: Annotated[str, typer.Argument(help="First model folder (t=0).")],
    model_b: Annotated[str, typer.Argument(help="Second model folder (t=1), same shapes and tokenizer.")],
    output: OutputOpt,
    slerp: Annotated[float, typer.Option("--slerp", help="Interpolation fraction t in [0, 1].")] = 0.5,
    force: ForceOpt = False,
) -> None:
    """Spherically interpolate every weight tensor of two models (e.g. two recovered models)."""
    if not 0.0 <= slerp <= 1.0:
        raise typer.BadParameter(f"{slerp} is not in [0, 1]", param_hint="--slerp")
    from zipkd.recover.merge import merge as run_merge

    out = run_merge(model_a, model_b, slerp, output, force=force)
    console.print(f"[bold green]merged[/] {model_a} ⟷ {model_b} at t={slerp} → {out}", highlight=False)
