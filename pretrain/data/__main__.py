"""`python -m pretrain.data ...`: prepare a token dataset, as prepare_fineweb.py runs it."""

import sys

from pretrain.cli import script_exit_code
from pretrain.data.cli import main
from pretrain.invocation import MODULE, set_started_as

set_started_as(MODULE)  # printed commands and usage lines then name `python -m` modules
sys.exit(script_exit_code(main))
