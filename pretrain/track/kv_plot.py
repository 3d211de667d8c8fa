"""The figure this research is about: validation loss against KV-cache bytes per token, one point per run.

A variant is worth its KV saving when its point sits left of baseline without rising much. The KV bytes
are the measured ones (python -m pretrain.infer_bench / compare --measure) when present, else the
formula's (bf16). Seed groups are one point with a ± sd error bar.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pretrain.track.plots import new_figure, save_png


def plot_quality_vs_kv(rows: Sequence[dict[str, Any]], out_png: str | os.PathLike) -> Path:
    """Scatter of best val loss vs KV bytes/token for compare's rows; written atomically, path returned."""
    fig, ax = new_figure("Quality vs KV cache", "KV-cache bytes per token (all layers)",
                         "best val cross-entropy loss", size=(7, 4.8))
    plotted = 0
    for r in rows:
        kv = r.get("kv_measured") or r.get("kv_bytes_per_token")
        loss = r.get("best_val_loss")
        if kv is None or loss is None or r.get("left_out"):  # an unfinished or duplicate run is not a result
            continue
        ax.errorbar([kv], [loss], yerr=[r.get("best_val_loss_sd") or 0.0], fmt="o", capsize=4,
                    label=f"{r['run']} ({r.get('variant') or '?'})")
        ax.annotate(str(r.get("variant") or r["run"]), (kv, loss), textcoords="offset points", xytext=(5, 5),
                    fontsize=8)
        plotted += 1
    if plotted:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no run has both a val loss and KV bytes", ha="center", va="center",
                transform=ax.transAxes)
    return save_png(fig, out_png)
