"""The chunked loss's eager loop (model/gpt.py ChunkedLinearCrossEntropy without --compile): per chunk of rows, the
LM-head GEMM, the chunk's cross-entropy and logit gradient (softmax - onehot) in place, then the gradient GEMMs
(model/loss_chunk.py backprop_chunk; on CPU in bf16 the weight gradient's by cpu_weight_grad).

Between the GEMMs the work is elementwise over rows x vocab (206 MB of bf16 logits at config S) and bound by
memory traffic around one exp per logit. Run over the whole chunk, each step (fp32 copy, softmax, copy back) is a
pass over a 412 MB fp32 copy in memory. On CPU the same steps run over a few rows at a time in a small fp32 buffer
that stays in the core's cache: the logits are read once and the gradient written once, the same ops on the same
rows giving the same values bit for bit. The exp of each logit (Sleef's 1-ulp exp inside the softmax kernel)
remains. Other devices run one kernel per step over the whole chunk (a kernel launch per block of rows would cost
more than it saves there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import is_fake

from .cpu_attention import amx_tiles, native_bf16
from .cpu_gemms import lm_head_grad_applies, lm_head_weight_grad
from .cpu_kernels import (
    ce_and_logit_grad_,
    ce_applies,
    transpose_applies,
    transpose_to_f32,
)
from .loss_chunk import backprop_chunk, lm_head_logits
from .weight_casts import kept_cast

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
                                     want_grad: bool, block_rows: int, block_fp32: torch.Tensor | None,
                                     row_logits: Callable[[int], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed CE of the chunk's logits `out_mm`, its rows' valid mask); with want_grad `out_mm` is overwritten in
    place by d(sum CE)/d logits rounded once to its dtype, except rows whose target is ignored (backprop_chunk masks
    them on rows x d instead). Softmax in fp32: through `block_fp32` (at least block_rows x vocab) when `out_mm` is
    not fp32, in place otherwise. Padded vocab columns (>= vocab_size) are set to -inf: never predicted.

    The CE comes from the softmax the gradient needs anyway. On CPU a row's CE is -log p(target), with no pass over
    the row for its max or its logsumexp (two of five passes over each block; 56 of 231 CPU-ms over config S's fp32
    chunk at 2 threads). While p(target) is a normal fp32 number its relative error is the softmax's own (a few
    ulp), so the CE's absolute error is a few 1e-7 (lse - logit rounds lse at the logits' magnitude too). A target
    probability below fp32's smallest normal (CE > ~87: an extremely confident wrong prediction) has lost precision
    or underflowed to 0: such rows, found per block before its gradient is written, take logsumexp - logit from
    their logits (on CPU looking at a block's few probabilities is free; on CUDA it would be a host sync per chunk,
    and fake tensors have no values): through `block_fp32` from `out_mm`, intact until the block's gradient is
    written back; with the fp32 softmax in place from `row_logits(r)`, the chunk's row r recomputed (its GEMM's
    row, summed in another order: within fp32 rounding). Elsewhere (other devices, fake tensors) the CE is
    logsumexp - logit, logsumexp = top - log(max p) from the row's largest logit and probability
    (max p = exp(0) / sum >= 1 / vocab never underflows)."""
    n, vocab = out_mm.shape
    valid = t_c != ignore_index
    if ce_applies(out_mm):  # one fused pass per row (model/cpu_kernels.py)
        ce = ce_and_logit_grad_(out_mm, torch.where(valid, t_c, 0), valid, vocab_size, want_grad)
        return ce.sum(), valid
    if vocab > vocab_size:
        out_mm[:, vocab_size:] = float("-inf")
    safe_t = torch.where(valid, t_c, 0).unsqueeze(1)
    minus_one = -valid.unsqueeze(1).float()
    if out_mm.device.type == "cpu" and not is_fake(out_mm):
        logits_of = row_logits if block_fp32 is None else out_mm.__getitem__
        return _ce_from_target_cpu(out_mm, safe_t, valid, minus_one, want_grad, block_rows, block_fp32,
                                   logits_of), valid
    picked = out_mm.gather(1, safe_t).squeeze(1).float()
    top = torch.empty((n, 1), dtype=torch.float32, device=out_mm.device)
    p_max = torch.empty_like(top)
    for i in range(0, n, block_rows):
        rows = slice(i, i + block_rows)
        m = min(block_rows, n - i)
        blk = out_mm[rows] if block_fp32 is None else block_fp32[:m].copy_(out_mm[rows])
        torch.amax(blk, -1, True, out=top[rows])
        torch.ops.aten._softmax.out(blk, -1, False, out=blk)  # one kernel: max, exp, sum and scale per row in cache
        torch.amax(blk, -1, True, out=p_max[rows])
        if want_grad:
            blk.scatter_add_(1, safe_t[rows], minus_one[rows])  # - onehot(target), in fp32 before the one rounding
            if block_fp32 is not None:
                out_mm[rows].copy_(blk)
    lse = (top - p_max.log()).squeeze(1)
    return ((lse - picked) * valid).sum(), valid


def _ce_from_target_cpu(out_mm: torch.Tensor, safe_t: torch.Tensor, valid: torch.Tensor, minus_one: torch.Tensor,
                        want_grad: bool, block_rows: int, block_fp32: torch.Tensor | None,
                        row_logits: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """chunk_loss_and_logit_grad_eager_'s CPU form: the summed CE as -log p(target), the rare underflowed rows from
    their logits, `row_logits(r)` (see there). The softmax runs through `block_fp32`, or in place where it is None
    (fp32 logits). The per-block views come from one split each: a block is a few rows (~300 blocks a chunk on one
    thread), so per-op Python overhead counts."""
    p_target = torch.empty((out_mm.shape[0], 1), dtype=torch.float32, device=out_mm.device)
    exact: list[tuple[int, torch.Tensor]] = []
    first = 0
    for rows, t_b, minus_b, p_b in zip(out_mm.split(block_rows), safe_t.split(block_rows),
                                        minus_one.split(block_rows), p_target.split(block_rows), strict=True):
        blk = rows if block_fp32 is None else block_fp32[:rows.shape[0]].copy_(rows)
        torch.ops.aten._softmax.out(blk, -1, False, out=blk)  # one kernel: max, exp, sum and scale per row in cache
        torch.gather(blk, 1, t_b, out=p_b)
        if p_b.min().item() < TINY:  # before the gradient overwrites these rows' logits
            exact += _underflowed(p_b, valid[first:first + rows.shape[0]], row_logits, first, safe_t)
        if want_grad:
            blk.scatter_add_(1, t_b, minus_b)  # - onehot(target), in fp32 before the one rounding
            if block_fp32 is not None:
                rows.copy_(blk)
        first += rows.shape[0]
    ce = torch.where(valid, p_target.squeeze(1).log().neg_(), 0.0)  # ignored rows' p may be 0: where, not * valid
    for r, row_ce in exact:
        ce[r] = row_ce
    return ce.sum()


# fp32's smallest normal number: a target probability below it has lost precision (or is 0).
TINY = torch.finfo(torch.float32).tiny


def _underflowed(p_target: torch.Tensor, valid: torch.Tensor, row_logits: Callable[[int], torch.Tensor], first: int,
                 safe_t: torch.Tensor) -> list[tuple[int, torch.Tensor]]:
    """(row, logsumexp - logit of `row_logits(row)`) for the valid rows of a block (rows first.. of the chunk)
    whose target probability is below fp32's smallest normal number."""
    low = ((p_target.squeeze(1) < TINY) & valid).nonzero().squeeze(1)
    rows = [] if low.numel() == 0 else (low + first).tolist()
    out = []
    for r in rows:
        logits = row_logits(r).float()
        out.append((r, torch.logsumexp(logits, 0) - logits[safe_t[r, 0]]))
    return out


def recomputed_row_logits(h_c: torch.Tensor, w: torch.Tensor, vocab_size: int) -> Callable[[int], torch.Tensor]:
    """Row r of the logits h_c @ w.T over the first vocab_size columns, recomputed (one row's GEMV): for rows whose
    logits the fp32 softmax in place has overwritten."""
    return lambda r: h_c[r] @ w[:vocab_size].t()


def cast_weight(weight: torch.Tensor, dtype: torch.dtype, kept: Callable[..., torch.Tensor] | None) -> torch.Tensor:
    """`weight` in the matmul dtype: on CPU its cast kept with it (model/weight_casts.py: made again only when the
    weight changed, written by the CPU update); else with `kept` (LossWorkspace.get) into a buffer kept between steps
    when it is at least KEEP_WEIGHT_BYTES."""
    cast = kept_cast(weight, dtype)
    if cast is not None:
        return cast
    if weight.dtype == dtype or kept is None or weight.numel() * dtype.itemsize < KEEP_WEIGHT_BYTES:
        return weight.to(dtype)
    return kept("weight_mm", weight.shape[0], weight.shape[1], dtype, weight.device).copy_(weight)


def lm_head_kernel_applies(g: torch.Tensor, h_c: torch.Tensor) -> bool:
    """Whether cpu_weight_grad runs the CPU kernels' GEMM for g^T h: where it applies (model/cpu_gemms.py), bf16 is
    native (not capped away: a bench emulating a smaller host, model/cpu_attention.py native_bf16) and the CPU has no
    AMX tiles, whose GEMMs oneDNN runs faster than any AVX-512-BF16 kernel (as attention's kernel yields to them:
    amx_tiles)."""
    return not amx_tiles() and native_bf16() and lm_head_grad_applies(g, h_c)


def cpu_weight_grad(g: torch.Tensor, h_c: torch.Tensor, valid: torch.Tensor, grad_w: torch.Tensor | None,
                    out: Callable[[], torch.Tensor] | None, defer: bool = False) -> torch.Tensor | PendingWeightGrad:
    """`grad_w` (vocab x d, fp32; None: a new one) plus the chunk's weight gradient g^T h (g: rows x vocab logit
    gradient, h_c: rows x d, both bf16; rows not `valid` left out). With `defer` (the last chunk, its g in the loss's
    kept buffer) the sum is returned pending (PendingWeightGrad): it runs in the loss's backward, scaled there in the
    same pass.

    On CPU with AVX-512-BF16 and no AMX (lm_head_kernel_applies) the CPU kernels' GEMM (csrc/cpu_lm_head.cpp) reads
    g row-major as the loss kernel wrote it and writes the fp32 gradient itself: 0.8-0.9x the time of torch's h^T g
    and its transposing pass (config S, Zen 5, 1 and 2 threads; bench/README.md sixteenth pass), its sums in fp32.
    Elsewhere on CPU, g^T h with g^T a transposed view makes oneDNN's bf16 kernel reorder the whole 206 MB logit
    gradient first (config S): 1.4-1.7x the time of the same GEMM on contiguous operands on an AMX host. h^T g has
    both operands row-major (h^T is a copy of rows x d, 1.5 MB) and writes the gradient transposed, into `out()`
    (d x vocab, g's dtype; None: a new one); turning that into vocab x d costs a transposing fp32 conversion (the CPU
    kernels' register-transposed tiles, ~6 ms; torch's strided copy 15-30) against ~80-100 CPU-ms saved (1 thread,
    config S). The sums are the same products in another order of accumulation inside the GEMM: each value within a
    bf16 rounding of the other form's, held against float64 (tests/test_loss_blocks.py)."""
    if lm_head_kernel_applies(g, h_c) and (grad_w is None or grad_w.is_contiguous()):
        def finish(scale: float) -> torch.Tensor:
            return lm_head_weight_grad(g, h_c, valid, grad_w, accumulate=grad_w is not None, scale=scale)
    else:
        # Masked by rows (contiguous), then transposed by one copy: a multiply reading h_c.t() strided took ~2x as long.
        h_t = (h_c * valid.unsqueeze(1).to(h_c.dtype)).t().contiguous()
        part_t = torch.mm(h_t, g) if out is None else torch.mm(h_t, g, out=out())
        if not (transpose_applies(part_t) and (grad_w is None or grad_w.is_contiguous())):
            if grad_w is None:
                return torch.empty(part_t.shape[::-1], dtype=torch.float32, device=g.device).copy_(part_t.t())
            return grad_w.add_(part_t.t())

        def finish(scale: float) -> torch.Tensor:
            return transpose_to_f32(part_t, grad_w, scale)
    return PendingWeightGrad(finish) if defer else finish(1.0)


class PendingWeightGrad:
    """The LM head's fp32 weight gradient whose last chunk is still to be made from operands in the loss's kept
    buffers (the logit gradient, or the bf16 GEMM output transposed): `scaled` makes it in the loss's backward times
    the upstream gradient in one pass, instead of making it in forward and scaling it by a second pass in backward
    (77 MB of fp32 at config S: ~2.4 ms a step on 1 thread). `settle` makes it unscaled, for when the buffers are
    about to be reused before this backward ran (another forward first: model/gpt.py LossWorkspace.settle)."""

    def __init__(self, finish: Callable[[float], torch.Tensor]) -> None:
        self._finish: Callable[[float], torch.Tensor] | None = finish  # scale -> (gradient so far + chunk) * scale
        self._grad: torch.Tensor | None = None

    def settle(self) -> None:
        if self._finish is not None:
            self._grad, self._finish = self._finish(1.0), None

    def scaled(self, scale: torch.Tensor) -> torch.Tensor:
        """The gradient times `scale` (0-dim fp32): the values of the sum's fp32 tensor .mul_(scale)."""
        if self._finish is None:
            assert self._grad is not None, "the loss's backward runs once"
            return self._grad.mul_(scale)
        grad, self._finish = self._finish(scale.item()), None
        return grad


def eager_chunk_loop(hh: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab_size: int, ignore_index: int,
                     chunk_rows: int, want_h: bool, want_w: bool, h_dtype: torch.dtype,
                     buffer: Callable[[str, int, int, torch.dtype], torch.Tensor], cpu_blocks: bool,
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | PendingWeightGrad | None]:
    """ChunkedLinearCrossEntropy's eager loop over `hh` (rows x d) and `w` (padded vocab x d), both in the matmul
    dtype. `buffer(name, rows, cols, dtype)` gives kept buffers. `cpu_blocks`: softmax over blocks of rows
    (softmax_block_rows) and a bf16 weight gradient by cpu_weight_grad, its last chunk's left pending; else one op
    per step over the whole chunk. Returns (summed loss, grad_h in h_dtype, grad_w in fp32,
    pending on CPU (PendingWeightGrad), or None) as ChunkedLinearCrossEntropy keeps them."""
    rows, (vocab, d) = hh.shape[0], w.shape
    dev, mm_dtype = hh.device, hh.dtype
    n_buf = min(chunk_rows, rows)
    block = min(softmax_block_rows(vocab, torch.get_num_threads()), n_buf) if cpu_blocks else n_buf
    cpu_w = cpu_blocks and want_w and mm_dtype != torch.float32
    keep_w = cpu_w and w.numel() * w.itemsize >= KEEP_WEIGHT_BYTES
    w_out = (lambda: buffer("grad_wT_mm", d, vocab, mm_dtype)) if keep_w else None  # for h^T g's output
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
        out_mm = lm_head_logits(h_c, w, buf_mm[:n])
        loss, valid = chunk_loss_and_logit_grad_eager_(out_mm, targets[i:i + n], vocab_size, ignore_index,
                                                       want_h or want_w, block, block_fp32,
                                                       recomputed_row_logits(h_c, w, vocab_size))
        total += loss
        if want_h or want_w:
            grad_h_rows = None if grad_h is None else grad_h[i:i + n]
            if cpu_w:
                backprop_chunk(out_mm, w, h_c, grad_h_rows, None, False, valid)
                grad_w = cpu_weight_grad(out_mm, h_c, valid, grad_w, w_out, defer=i + chunk_rows >= rows)
            else:
                grad_w = backprop_chunk(out_mm, w, h_c, grad_h_rows, grad_w, want_w, valid)
    if want_w and grad_w is None:  # no rows
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=dev)
    return total, grad_h, grad_w
