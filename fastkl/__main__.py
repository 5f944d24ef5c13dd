"""``python -m fastkl``: the command line of ``fastkl.cli``."""

import sys

# closed_form, gaussian_samples: tests/test_reports.py imports the demo's from here
from ._demo import closed_form, gaussian_samples  # noqa: F401
from .cli import main

if __name__ == "__main__":
    sys.exit(main())
