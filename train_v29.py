"""Train a decoder LM on a token dataset: `python train_v29.py --data DIR --size tiny --steps 200`.

Re-running the same command resumes from `<out-dir>/last.pt`. Flags: `python train_v29.py --help`.
"""

import sys

from pretrain.errors import script_exit_code
from pretrain.train.entry import main

if __name__ == "__main__":
    sys.exit(script_exit_code(main))
