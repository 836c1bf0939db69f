"""`python -m swift_sophia COMMAND ...`: the `sophia` command (sophia_cli.py)."""
import sys

from sophia_cli import main

if __name__ == "__main__":
    sys.exit(main())
