"""`python -m pretrain.infer_bench`: the measured inference cost CLI (code in pretrain/evals/infer_bench.py)."""

from __future__ import annotations

import sys

from pretrain.cli import script_exit_code
from pretrain.evals.infer_bench import main

if __name__ == "__main__":
    sys.exit(script_exit_code(main))
