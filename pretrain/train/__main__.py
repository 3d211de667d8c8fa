"""`python -m pretrain.train ...`: the trainer, as train_v29.py runs it (for installs without the repo's scripts)."""

import sys

from pretrain.cli import script_exit_code
from pretrain.train.cli import main

sys.exit(script_exit_code(main))
