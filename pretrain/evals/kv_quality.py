"""What a quantized KV cache costs in quality: held-out loss decoded token by token through the cache.

Teacher forcing: rows of held-out text are fed one token at a time, each step attending to the cache built
from the previous steps (keys and values quantized as they enter it), and the next token is scored. The same
rows through the model's own cache give the reference, so `val_loss_delta` is what the cache format alone
adds (the model's own cache reproduces the full forward's logits; tests/test_kv_quant.py).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from model import GPT
    from model.kv_formats import KVSetting

DEFAULT_QUALITY_TOKENS = 1024
MAX_WINDOW = 256  # tokens per decoded row: long enough for the cache to matter, short enough for CPU


def decode_loss(model: GPT, tokens: torch.Tensor, setting: KVSetting | None) -> float:
    """Mean next-token cross-entropy of (B, T+1) `tokens`, decoding T steps through a cache in `setting`
    (None: the model's own cache)."""
    import torch
    import torch.nn.functional as F

    x, y = tokens[:, :-1], tokens[:, 1:]
    B, T = x.shape
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        caches = model.new_caches(B, T, setting)
        for t in range(T):
            logits = model.lm_head(model.hidden_states(x[:, t:t + 1], caches)[:, -1])[:, :model.config.vocab_size]
            total += F.cross_entropy(logits.float(), y[:, t], reduction="sum").double().cpu()
    return float(total) / (B * T)


def held_out_rows(run_dir: Path, block_size: int, n_tokens: int, device: torch.device) -> torch.Tensor | None:
    """(rows, window + 1) tokens from the start of the run's validation split, about n_tokens targets; None
    (with one stderr line saying why) when the run's data cannot be opened or holds too little."""
    import numpy as np
    import torch

    from pretrain.data.dataset import open_dataset
    from pretrain.errors import UserError
    from pretrain.track.runlog import JSONL_NAME, read_jsonl

    meta = next((r for r in read_jsonl(run_dir / JSONL_NAME) if r.get("type") == "meta"), {})
    tcfg = meta.get("train_config") or {}
    window = min(block_size, MAX_WINDOW, max(1, n_tokens))
    try:
        ds = open_dataset(tcfg.get("data", ""), tcfg.get("val_frac", 0.0))
    except UserError as e:
        print(f"note: {run_dir.name}: no KV-cache quality figures ({e})", file=sys.stderr)
        return None
    rows: list[np.ndarray] = []
    want = max(1, math.ceil(n_tokens / window))
    for seg in ds.val:
        for a in range(0, len(seg) - window, window + 1):
            if len(rows) < want:
                rows.append(np.asarray(seg[a:a + window + 1], dtype=np.int64))
    if not rows:
        print(f"note: {run_dir.name}: no KV-cache quality figures (the validation split of {ds.path} holds "
              f"no window of {window + 1} tokens)", file=sys.stderr)
        return None
    return torch.from_numpy(np.stack(rows)).to(device)


def quality(model: GPT, tokens: torch.Tensor | None, settings: list[KVSetting]) -> dict[str, dict[str, Any]]:
    """{setting name: {"val_loss", "val_loss_delta"}} decoded over `tokens`; empty when there are none."""
    if tokens is None:
        return {}
    reference = decode_loss(model, tokens, None)
    out = {}
    for s in settings:
        loss = decode_loss(model, tokens, s)
        out[s.name] = {"val_loss": loss, "val_loss_delta": loss - reference, "quality_tokens": tokens[:, 1:].numel()}
    return out
