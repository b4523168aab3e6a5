"""``python -m orgnn.cli`` and ``torchrun -m orgnn.cli``: the ``orgnn`` program."""
import sys

from orgnn.cli.entry import main

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
