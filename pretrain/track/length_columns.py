"""compare's per-length columns (--eval-seq-lens): a run's `val@<length>` losses on the same targets with their
standard errors, the columns any run has, and the plot of val loss against eval length.

Read from the last `eval_lengths` event (pretrain/evals/lengths.py), which scores the same target tokens at every
length; its `loss_se` per length is carried as `val@<length>_se` so one run shows ± se and a seed group combines it
like the other val losses.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pretrain.track.plots import new_figure, save_png
from pretrain.units import finite_number


def length_fields(last_lengths: dict[str, Any]) -> dict[str, Any]:
    """The flat `val@<length>` (and `_se`) keys of an eval_lengths event, so seed groups average them."""
    ses = last_lengths.get("loss_se") or {}
    out: dict[str, Any] = {}
    for n, v in (last_lengths.get("loss") or {}).items():
        if finite_number(v) is not None:
            out[f"val@{n}"] = v
            out[f"val@{n}_se"] = finite_number(ses.get(n))
    return out


def length_columns(rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """One `val@<length>` column per --eval-seq-lens length any run evaluated, shortest first."""
    lengths = sorted({int(k[4:]) for r in rows for k in r if k.startswith("val@") and not k.endswith(("_sd", "_se"))})
    return {f"val@{n}": f"val@{n}" for n in lengths}


def plot_length_curves(rows: Sequence[dict[str, Any]], out_png: str | os.PathLike) -> Path:
    """Val loss against eval length (last eval), one line per run, its trained length marked on the line."""
    fig, ax = new_figure("Validation loss vs eval length (last eval)", "eval sequence length (tokens)",
                         "val cross-entropy loss", size=(8, 4.8))
    ax.set_xscale("log", base=2)
    for r in rows:
        points = sorted((r.get("length_loss") or {}).items())
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        line = ax.plot(xs, ys, "o-", ms=4, lw=1.5, label=f"{r['run']} ({r['variant']})")[0]
        trained = r.get("trained_len")
        if isinstance(trained, int):
            ax.axvline(trained, color=line.get_color(), ls=":", lw=1)
    ax.legend(title="dotted: length trained so far")
    return save_png(fig, out_png)
