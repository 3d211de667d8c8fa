"""Plan (and with --run, start) a pretraining run: `python run_1b_launch.py --data DIR --target-tokens 10B`.

Prints the plan for this machine's VRAM tier and the exact trainer command; `--run` executes it; running the
same line again after a preemption resumes. Flags: `python run_1b_launch.py --help`; tiers: docs/tiers.md.
"""

import sys

from pretrain.errors import script_exit_code
from pretrain.plan.entry import main

if __name__ == "__main__":
    sys.exit(script_exit_code(main))
