"""`python -m leaf_xla COMMAND ...`, the same as the `leaf-xla` console script."""

from leaf_xla.cli import main

main()
