"""`python tests/slow_prepare.py SECONDS ARGS...`: prepare_fineweb.py pausing SECONDS after each shard it saves.

Kill and signal tests need a prepare slow enough to be caught between shards; the pause is patched in here
rather than being a knob of the production code.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.data import entry, prepare  # noqa: E402
from pretrain.errors import script_exit_code  # noqa: E402


def _pausing(save_shard: Callable[..., None], pause: float) -> Callable[..., None]:
    def save_then_pause(*args: Any, **kwargs: Any) -> None:
        save_shard(*args, **kwargs)
        time.sleep(pause)

    return save_then_pause


if __name__ == "__main__":
    prepare._save_shard = _pausing(prepare._save_shard, float(sys.argv[1]))
    # Imports done, main (which installs the SIGTERM handler first) next: a signal test starts its clock here, as
    # a signal during the interpreter's own start-up can only take the signal's default action.
    print("started", file=sys.stderr, flush=True)
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    sys.exit(script_exit_code(entry.main))
