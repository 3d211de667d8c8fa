"""`python -m pretrain.plan ...`: the launcher (plan, --run, compare), as run_1b_launch.py runs it."""

import sys

from pretrain.errors import script_exit_code
from pretrain.invocation import MODULE, set_started_as
from pretrain.plan.entry import main

set_started_as(MODULE)  # printed commands and usage lines then name `python -m` modules
sys.exit(script_exit_code(main))
