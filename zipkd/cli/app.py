"""The Typer application object; command modules register themselves on it."""

import typer

app = typer.Typer(
    name="zipkd",
    help="Compress causal LMs so they are measurably faster on your hardware: profile → prune → recover → "
    "quantize → eval. Works offline; the default model is the embedded SmolLM2-135M-Instruct.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
