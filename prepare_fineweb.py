"""Stream FineWeb-Edu (or local parquet/jsonl/json/txt files), tokenize, write .npy token shards.

    python prepare_fineweb.py --tokens 1B --output data/fineweb_1b
    python prepare_fineweb.py --tokens 200K --source notes/*.txt --output data/notes

Rerunning the same command continues an interrupted run; a larger --tokens extends the dataset.
Flags: `python prepare_fineweb.py --help`; the work happens in pretrain/data/prepare.py.
"""

import sys

from pretrain.data.entry import main
from pretrain.errors import script_exit_code

if __name__ == "__main__":
    sys.exit(script_exit_code(main))
