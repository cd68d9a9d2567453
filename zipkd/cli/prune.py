"""`zipkd prune` (placeholder until its issue lands)."""

from zipkd.cli.app import app
from zipkd.cli.common import not_built


@app.command(name="prune", rich_help_panel="Pipeline")
def prune() -> None:
    """Not built yet."""
    not_built("prune")
