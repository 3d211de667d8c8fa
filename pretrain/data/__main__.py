"""`python -m pretrain.data ...`: prepare a token dataset, as prepare_fineweb.py runs it."""

import sys

from pretrain.cli import script_exit_code
from pretrain.data.cli import main

sys.exit(script_exit_code(main))
