"""``python -m fastig`` (and ``torchrun -m fastig``) run the CLI."""

from fastig.cli import main

main()
