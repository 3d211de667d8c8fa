"""Train a decoder LM on a token dataset: `python train_v29.py --data DIR --size tiny --steps 200`.

Re-running the same command resumes from `<out-dir>/last.pt`. Flags: `python train_v29.py --help`.
"""

import sys

from pretrain.cli import run_cli
from pretrain.train.loop import main

if __name__ == "__main__":
    sys.exit(run_cli(main))
