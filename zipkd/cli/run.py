"""`zipkd run` (placeholder until its issue lands)."""

from zipkd.cli.app import app
from zipkd.cli.common import not_built


@app.command(name="run", rich_help_panel="Pipeline")
def run() -> None:
    """Not built yet."""
    not_built("run")
