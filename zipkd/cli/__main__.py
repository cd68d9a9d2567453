"""`python -m zipkd.cli …` (and `accelerate launch -m zipkd.cli recover …`)."""

from zipkd.cli import main

main()
