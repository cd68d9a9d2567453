"""Command-line interface: a thin Typer layer over the Python API. Heavy imports live inside commands,
so `zipkd --help` stays instant."""

from zipkd.cli import evaluate, export, info, merge, profile, prune, quantize, recover, run  # noqa: F401  (register)
from zipkd.cli.app import app


def main() -> None:
    app()
