"""`python -m zipkd …`, the same as the `zipkd` command."""

from zipkd.cli import main

main()
