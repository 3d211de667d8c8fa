"""Entry point placeholder: lands with its issue."""

import sys

if __name__ == "__main__":
    print("error: run_1b_launch.py is not implemented yet", file=sys.stderr)
    sys.exit(2)
