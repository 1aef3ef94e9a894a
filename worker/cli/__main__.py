"""``python -m worker.cli``: the same as the ``cacheship`` console script."""

from worker.cli import main

main()
