"""`zipkd merge` (placeholder until its issue lands)."""

from zipkd.cli.app import app
from zipkd.cli.common import not_built


@app.command(name="merge", rich_help_panel="Pipeline")
def merge() -> None:
    """Not built yet."""
    not_built("merge")
