"""`python -m pretrain.train ...`: the trainer, as train_v29.py runs it (for installs without the repo's scripts)."""

import sys

from pretrain.errors import script_exit_code
from pretrain.invocation import MODULE, set_started_as
from pretrain.train.entry import main

set_started_as(MODULE)  # printed commands and usage lines then name `python -m` modules
sys.exit(script_exit_code(main))
