"""`python -m pretrain.data ...`: prepare a token dataset, as prepare_fineweb.py runs it."""

import sys

from pretrain.data.entry import main
from pretrain.errors import script_exit_code
from pretrain.invocation import MODULE, set_started_as

set_started_as(MODULE)  # printed commands and usage lines then name `python -m` modules
sys.exit(script_exit_code(main))
