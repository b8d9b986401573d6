"""`python -m aselect ...` is the `aselect` command."""

from aselect.flows.cli import entry

if __name__ == "__main__":
    entry()
