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


def plot_quality_vs_kv(rows: Sequence[dict[str, Any]], out_png: str | os.PathLike) -> Path:
    """Scatter of best val loss vs KV bytes/token for compare's rows; written atomically, path returned."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title("Quality vs KV cache")
    ax.set_xlabel("KV-cache bytes per token (all layers)")
    ax.set_ylabel("best val cross-entropy loss")
    ax.grid(True, alpha=0.3)
    plotted = 0
    for r in rows:
        kv = r.get("kv_measured") or r.get("kv_bytes_per_token")
        loss = r.get("best_val_loss")
        if kv is None or loss is None:
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
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, out)  # a viewer refreshing the file never sees half a PNG
    return out
