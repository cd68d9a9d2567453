"""`zipkd profile` (placeholder until its issue lands)."""

from zipkd.cli.app import app
from zipkd.cli.common import not_built


@app.command(name="profile", rich_help_panel="Pipeline")
def profile() -> None:
    """Not built yet."""
    not_built("profile")
