"""`zipkd quantize` (placeholder until its issue lands)."""

from zipkd.cli.app import app
from zipkd.cli.common import not_built


@app.command(name="quantize", rich_help_panel="Pipeline")
def quantize() -> None:
    """Not built yet."""
    not_built("quantize")
