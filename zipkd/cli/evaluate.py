"""`zipkd eval` (placeholder until its issue lands)."""

from zipkd.cli.app import app
from zipkd.cli.common import not_built


@app.command(name="eval", rich_help_panel="Pipeline")
def evaluate() -> None:
    """Not built yet."""
    not_built("eval")
