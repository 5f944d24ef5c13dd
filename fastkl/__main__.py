"""``python -m fastkl``: the command line of ``fastkl.cli``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
