"""`python -m aselect ...` is the `aselect` command."""

import sys

from aselect.flows.cli import main

if __name__ == "__main__":
    sys.exit(main())
