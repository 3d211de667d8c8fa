"""Entry point placeholder: lands with its issue."""

import sys

if __name__ == "__main__":
    print("error: prepare_fineweb.py is not implemented yet", file=sys.stderr)
    sys.exit(2)
