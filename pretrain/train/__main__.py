"""`python -m pretrain.train ...`: the trainer, as train_v29.py runs it (for installs without the repo's scripts)."""

import sys

from pretrain.cli import run_cli
from pretrain.train.loop import main

sys.exit(run_cli(main))
