"""Attention maps of chosen layers/heads at an analysis step (--attn-map-layers / --attn-map-heads), on disk.

One small file per analysis step, `attn_maps/step_<N>.npz`: an array "L<layer>_H<head>" per map, float16,
(n, n[+1]) = the first diagnostic sequence's first n = min(256, T) queries over the same keys, the null slot as
column 0 when the model has one (so every row sums to 1), plus `null_slot` (0/1). Beside it
`attn_maps/step_<N>.png`, the maps as heatmaps, for eyes; the npz is for analysis (numpy.load).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pretrain.errors import UserError
from pretrain.track.plots import save_png

ATTN_MAP_DIR = "attn_maps"


def map_path(run_dir: str | os.PathLike, step: int, suffix: str = ".npz") -> Path:
    return Path(run_dir) / ATTN_MAP_DIR / f"step_{step:06d}{suffix}"


def save_attention_maps(run_dir: str | os.PathLike, step: int, maps: Mapping[str, np.ndarray],
                        null_slot: bool) -> Path:
    """Write step_<N>.npz and its heatmap step_<N>.png (atomically); returns the PNG's path."""
    npz = map_path(run_dir, step)
    npz.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, null_slot=np.int8(null_slot), **{k: v.astype(np.float16) for k, v in maps.items()})
    tmp = npz.with_name(f".{npz.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, npz)  # a kill mid-write never leaves half an npz
    return save_png(heatmap_figure(maps, step, null_slot), map_path(run_dir, step, ".png"))


def heatmap_figure(maps: Mapping[str, np.ndarray], step: int, null_slot: bool) -> object:
    """One heatmap per map (query down, key across), on a log colour scale: attention spans decades."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    cols = min(4, len(maps))
    rows = math.ceil(len(maps) / cols)
    fig = Figure(figsize=(3.4 * cols, 3.2 * rows), layout="constrained")
    fig.suptitle(f"Attention maps at step {step}" + (" (column 0: null slot)" if null_slot else ""))
    for i, (name, a) in enumerate(maps.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        a = np.asarray(a, dtype=np.float32)
        im = ax.imshow(np.where(a > 0, a, np.nan), cmap="viridis", norm=LogNorm(vmin=1e-4, vmax=1.0),
                       interpolation="nearest", aspect="auto")
        ax.set_title(name.replace("_", " "))
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def _indices(text: str, count: int, flag: str, what: str) -> tuple[int, ...]:
    """"0,-1" -> (0, count - 1); UserError naming the flag for anything else."""
    try:
        raw = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: give comma-separated {what} numbers, e.g. {flag} 0,-1") from None
    bad = [i for i in raw if not -count <= i < count]
    if bad:
        raise UserError(f"{flag}: {what} {bad[0]} does not exist (the model has {count}: 0..{count - 1} or "
                        f"-1..-{count})")
    return tuple(sorted({i % count for i in raw}))


def attention_map_choice(layers: str, heads: str, analysis_every: int, n_layer: int,
                         n_head: int) -> dict[int, tuple[int, ...]]:
    """--attn-map-layers x --attn-map-heads as layer -> heads (empty: no maps); UserError for a bad choice."""
    if not layers.strip():
        return {}
    if not analysis_every:
        raise UserError("--attn-map-layers saves maps at each analysis step: add --analysis-every N")
    chosen = _indices(layers, n_layer, "--attn-map-layers", "layer")
    head_ids = _indices(heads, n_head, "--attn-map-heads", "head")
    if not head_ids:
        raise UserError("--attn-map-heads is empty: name the heads to save, e.g. --attn-map-heads 0")
    return {layer: head_ids for layer in chosen}
