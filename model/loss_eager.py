"""The chunked loss's eager loop (model/gpt.py ChunkedLinearCrossEntropy without --compile): per chunk of rows, the
LM-head GEMM, the chunk's cross-entropy and logit gradient (softmax - onehot) in place, then the gradient GEMMs
(model/loss_chunk.py backprop_chunk).

Between the GEMMs the work is elementwise over rows x vocab (206 MB of bf16 logits at config S) and bound by
memory traffic around one exp per logit. Run over the whole chunk, each step (fp32 copy, max, softmax, max, copy
back) is a pass over a 412 MB fp32 copy in memory. On CPU the same steps run over a few rows at a time in a small
fp32 buffer that stays in the core's cache: the logits are read once and the gradient written once, the same ops on
the same rows giving the same values bit for bit. The exp of each logit (Sleef's 1-ulp exp inside the softmax kernel)
remains: ~55 ms of the ~85 ms this takes at config S on one AVX-512 (Zen 4) core. Other devices run one kernel per
step over the whole chunk (a kernel launch per block of rows would cost more than it saves there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .loss_chunk import backprop_chunk

# fp32 bytes of a softmax block per thread: 7 rows at a 50K vocab (a Zen 4 core's L2 is 1 MiB). Fewer rows make
# more Python calls per chunk (6 a block), more spill the block further out (config S, 1 thread, loaded host:
# 5 rows 113 CPU-ms, 8 rows 107, 16 rows 123, the whole chunk 143).
BLOCK_BYTES_PER_THREAD = 3 << 19
# Weight-sized bf16 blocks (the weight's cast, its gradient's GEMM output) are kept between steps from this size:
# glibc's largest mmap threshold (pretrain/train/host_alloc.py), above which each step maps and faults them in again
# (38 MB each at config S); smaller ones its heap reuses as they are, and the planner's trace stays exact for them.
KEEP_WEIGHT_BYTES = 32 << 20


def softmax_block_rows(vocab: int, threads: int) -> int:
    """Rows of one softmax block on CPU: BLOCK_BYTES_PER_THREAD of fp32 logits per thread (rows split over threads)."""
    return max(1, BLOCK_BYTES_PER_THREAD * max(1, threads) // (4 * vocab))


def chunk_loss_and_logit_grad_eager_(out_mm: torch.Tensor, t_c: torch.Tensor, vocab_size: int, ignore_index: int,
                                     want_grad: bool, block_rows: int,
                                     block_fp32: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed CE of the chunk's logits `out_mm`, its rows' valid mask); with want_grad `out_mm` is overwritten in
    place by d(sum CE)/d logits rounded once to its dtype, except rows whose target is ignored (backprop_chunk masks
    them on rows x d instead). Softmax in fp32: through `block_fp32` (at least block_rows x vocab) when `out_mm` is
    not fp32, in place otherwise. Padded vocab columns (>= vocab_size) are set to -inf: never predicted."""
    n, vocab = out_mm.shape
    if vocab > vocab_size:
        out_mm[:, vocab_size:] = float("-inf")
    valid = t_c != ignore_index
    safe_t = torch.where(valid, t_c, 0).unsqueeze(1)
    picked = out_mm.gather(1, safe_t).squeeze(1).float()
    top = torch.empty((n, 1), dtype=torch.float32, device=out_mm.device)
    p_max = torch.empty_like(top)
    minus_one = -valid.unsqueeze(1).float()
    for i in range(0, n, block_rows):
        rows = slice(i, i + block_rows)
        m = min(block_rows, n - i)
        blk = out_mm[rows] if block_fp32 is None else block_fp32[:m].copy_(out_mm[rows])
        # logsumexp by hand: torch.logsumexp allocates a temporary the size of its input. The softmax kernel is one
        # pass (max, exp, sum and scaling while a row is in cache); the top logit's probability is exp(0) / sum, the
        # row's largest, so logsumexp = top - log(max p), and max p >= 1 / vocab never underflows.
        torch.amax(blk, -1, True, out=top[rows])
        torch.ops.aten._softmax.out(blk, -1, False, out=blk)
        torch.amax(blk, -1, True, out=p_max[rows])
        if want_grad:
            blk.scatter_add_(1, safe_t[rows], minus_one[rows])  # - onehot(target), in fp32 before the one rounding
            if block_fp32 is not None:
                out_mm[rows].copy_(blk)
    lse = (top - p_max.log()).squeeze(1)
    return ((lse - picked) * valid).sum(), valid


def cast_weight(weight: torch.Tensor, dtype: torch.dtype, kept: Callable[..., torch.Tensor] | None) -> torch.Tensor:
    """`weight` in the matmul dtype; with `kept` (LossWorkspace.get) into a buffer kept between steps when it is at
    least KEEP_WEIGHT_BYTES."""
    if weight.dtype == dtype or kept is None or weight.numel() * dtype.itemsize < KEEP_WEIGHT_BYTES:
        return weight.to(dtype)
    return kept("weight_mm", weight.shape[0], weight.shape[1], dtype, weight.device).copy_(weight)


def eager_chunk_loop(hh: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab_size: int, ignore_index: int,
                     chunk_rows: int, want_h: bool, want_w: bool, h_dtype: torch.dtype,
                     buffer: Callable[[str, int, int, torch.dtype], torch.Tensor], cpu_blocks: bool,
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """ChunkedLinearCrossEntropy's eager loop over `hh` (rows x d) and `w` (padded vocab x d), both in the matmul
    dtype. `buffer(name, rows, cols, dtype)` gives kept buffers. `cpu_blocks`: softmax over blocks of rows
    (softmax_block_rows) and the weight gradient's GEMM output in a kept buffer; else one op per step over the whole
    chunk. Returns (summed loss, grad_h in h_dtype, grad_w in fp32 or None) as ChunkedLinearCrossEntropy saves them."""
    rows, (vocab, d) = hh.shape[0], w.shape
    dev, mm_dtype = hh.device, hh.dtype
    n_buf = min(chunk_rows, rows)
    block = min(softmax_block_rows(vocab, torch.get_num_threads()), n_buf) if cpu_blocks else n_buf
    keep_w = cpu_blocks and want_w and mm_dtype != torch.float32 and w.numel() * w.itemsize >= KEEP_WEIGHT_BYTES
    w_out = buffer("grad_w_mm", vocab, d, mm_dtype) if keep_w else None
    buf_mm = buffer("logits_mm", n_buf, vocab, mm_dtype)
    # The fp32 buffer is named for its size: a whole chunk's (kept between steps) or a block's.
    name = "logits_fp32" if block == n_buf else "softmax_block_fp32"
    block_fp32 = buffer(name, block, vocab, torch.float32) if mm_dtype != torch.float32 else None
    grad_h = torch.empty(hh.shape, dtype=h_dtype, device=dev) if want_h else None
    grad_w = None
    total = torch.zeros((), dtype=torch.float32, device=dev)
    for i in range(0, rows, chunk_rows):
        h_c = hh[i:i + chunk_rows]
        n = h_c.shape[0]
        out_mm = torch.mm(h_c, w.t(), out=buf_mm[:n])
        loss, valid = chunk_loss_and_logit_grad_eager_(out_mm, targets[i:i + n], vocab_size, ignore_index,
                                                       want_h or want_w, block, block_fp32)
        total += loss
        if want_h or want_w:
            grad_w = backprop_chunk(out_mm, w, h_c, None if grad_h is None else grad_h[i:i + n], grad_w, want_w,
                                    valid, w_out)
    if want_w and grad_w is None:  # no rows
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=dev)
    return total, grad_h, grad_w
