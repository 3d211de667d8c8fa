"""`python -m pretrain.plan ...`: the launcher (plan, --run, compare), as run_1b_launch.py runs it."""

import sys

from pretrain.cli import run_cli
from pretrain.plan.launch import main

sys.exit(run_cli(main))
