"""`python -m pretrain.plan ...`: the launcher (plan, --run, compare), as run_1b_launch.py runs it."""

import sys

from pretrain.cli import script_exit_code
from pretrain.plan.cli import main

sys.exit(script_exit_code(main))
