"""`zipkd recover` (placeholder until its issue lands)."""

from zipkd.cli.app import app
from zipkd.cli.common import not_built


@app.command(name="recover", rich_help_panel="Pipeline")
def recover() -> None:
    """Not built yet."""
    not_built("recover")
