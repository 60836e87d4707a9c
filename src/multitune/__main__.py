"""Run the multitune command line: ``python -m multitune``."""

import sys

from multitune.cli import main

if __name__ == "__main__":
    sys.exit(main())
