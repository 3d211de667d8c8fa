"""`python -m pretrain.data ...`: prepare a token dataset, as prepare_fineweb.py runs it."""

import sys

from pretrain.cli import run_cli
from pretrain.data.cli import main

sys.exit(run_cli(main))
