"""compare's attention-diagnostics columns: each run's last `diagnostics` event (--analysis-every), layer means.

The paper's instruments (pretrain/evals/paper_metrics.py) side by side across variants: attention entropy, top-k and
local-window mass, the attention matrices' effective rank, the original's semantic share and the projections'
stable rank (the mean over every attention projection of every layer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pretrain.units import finite_number

# row key -> header; a row key is "diag:<layer-mean key>".
DIAG_COLUMNS = {"diag:entropy": "attn entropy", "diag:topk_mass": "top-k mass", "diag:local_mass": "local mass",
                "diag:attn_erank": "attn erank", "diag:share_sem_msq": "sem share msq",
                "diag:stable_rank": "stable rank"}


def diag_fields(records: Sequence[dict]) -> dict[str, float]:
    """{"diag:topk_mass": ..., ...} from the last diagnostics event of a run's train.jsonl (empty without one)."""
    last = next((r for r in reversed(records) if r.get("type") == "diagnostics" and isinstance(r.get("mean"), dict)),
                None)
    if last is None:
        return {}
    means = {k: v for k, v in last["mean"].items() if finite_number(v) is not None}
    stable = [v for k, v in means.items() if k.startswith("stable_rank_")]
    if stable:
        means["stable_rank"] = sum(stable) / len(stable)
    return {key: means[key[5:]] for key in DIAG_COLUMNS if key[5:] in means}


def diag_columns(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The DIAG_COLUMNS some row has a figure for, in their order."""
    return {k: h for k, h in DIAG_COLUMNS.items() if any(r.get(k) is not None for r in rows)}
