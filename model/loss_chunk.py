"""The chunked loss's compiled chunk (the trainer's --compile): between the LM-head GEMMs, each chunk's softmax,
cross-entropy and logit gradient as one torch.compile'd function, which inductor makes one fused kernel writing the
gradient in place into the logits buffer (model/gpt.py's ChunkedLinearCrossEntropy runs this loop instead of its
eager one). Static shapes: equal chunks, the last padded with ignored rows, one graph per step shape. Both loops run
their GEMMs through this module's lm_head_logits and backprop_chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .cpu_attention import native_bf16

# Vocab columns per GEMM of the bf16 LM-head forward on a CPU with native bf16. oneDNN runs h @ W^T over a whole
# 50K vocab at about half the rate of the same product cut into column blocks written in place (AMX host, config S's
# 2048 x 384 @ 384 x 50304: 119 -> 69 CPU-ms on 1 thread, 137 -> 60 on 2; the 1b's d 2048: 354 -> 227 CPU-ms on 2).
# 2048 to 8192 columns run alike at d 384, 8192 best at d 2048; fp32 (no change either way) stays one GEMM.
VOCAB_BLOCK = 8192


def lm_head_logits(h_c: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`out` (rows x padded vocab) = h_c @ w^T, written in place: on a CPU with native bf16, for plain bf16
    tensors, in blocks of VOCAB_BLOCK vocab columns (each block's GEMM writes its columns of `out` through its row
    stride: no temporary), elsewhere one GEMM. Each logit is the same dot product over d either way, summed in
    oneDNN's order for the shape (bit-identical at d 384 on the host above, within a bf16 rounding at d 2048).
    Fake tensors (the planner's trace) take the one GEMM: the same memory, one op to trace instead of seven."""
    if (out.device.type != "cpu" or w.dtype != torch.bfloat16 or w.shape[0] <= VOCAB_BLOCK
            or not all(type(t) is torch.Tensor for t in (h_c, w, out)) or not native_bf16()):
        return torch.mm(h_c, w.t(), out=out)
    for v in range(0, w.shape[0], VOCAB_BLOCK):
        torch.mm(h_c, w[v:v + VOCAB_BLOCK].t(), out=out[:, v:v + VOCAB_BLOCK])
    return out


def chunk_loss_and_logit_grad_(logits: torch.Tensor, t_c: torch.Tensor, vocab_size: int, ignore_index: int,
                               want_grad: bool) -> torch.Tensor:
    """One chunk of the loss between its matmuls: the summed CE of `logits` (rows x padded vocab, the matmul dtype)
    over rows whose target is not ignore_index; with want_grad, `logits` is overwritten in place by d(sum CE)/d
    logits (softmax - onehot, ignored rows and padded columns 0).

    Written as one expression, without the eager loop's in-place steps, so torch.compile makes it one fused kernel
    (eager: ~15 passes over chunk x vocab floats); softmax in fp32. Writing the gradient into the caller's buffer
    keeps the chunk-sized memory the caller's (kept between steps on CPU, no page faults)."""
    x = logits.float()
    cols = torch.arange(x.shape[1], device=x.device)
    if x.shape[1] > vocab_size:
        x = x.masked_fill(cols >= vocab_size, float("-inf"))
    valid = t_c != ignore_index
    safe_t = torch.where(valid, t_c, 0).unsqueeze(1)
    lse = torch.logsumexp(x, dim=-1)
    loss = ((lse - x.gather(1, safe_t).squeeze(1)) * valid).sum()
    if want_grad:
        logits.copy_((torch.exp(x - lse.unsqueeze(1)) - (cols == safe_t).float()) * valid.unsqueeze(1))
    return loss


_compiled_chunk: Callable[..., torch.Tensor] | None = None



def backprop_chunk(g: torch.Tensor, w: torch.Tensor, h_c: torch.Tensor, grad_h_rows: torch.Tensor | None,
                   grad_w: torch.Tensor | None, want_w: bool, valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """From one chunk's logit gradient `g`: write its rows of the hidden states' gradient into `grad_h_rows` and
    return the weight's gradient accumulated in fp32 (without a weight-sized temporary per chunk where the dtypes
    allow it). Shared by the eager loop (model/gpt.py) and the compiled one.

    `valid` (rows,): rows whose gradient counts although their row of `g` is not zero (the eager loop's ignored
    targets). Zeroing their h rows and grad_h rows gives exactly the products of zeroed g rows, for a pass over
    rows x d instead of rows x vocab. (The eager CPU loop takes bf16 weight gradients its own way:
    model/loss_eager.py cpu_weight_grad.)"""
    if grad_h_rows is not None:
        if g.dtype == grad_h_rows.dtype:
            torch.mm(g, w, out=grad_h_rows)
        else:
            grad_h_rows.copy_(g @ w)
        if valid is not None:
            grad_h_rows.mul_(valid.unsqueeze(1))
    if want_w:
        if valid is not None:
            h_c = h_c * valid.unsqueeze(1).to(h_c.dtype)
        if g.dtype == torch.float32:
            return (g.t() @ h_c) if grad_w is None else grad_w.addmm_(g.t(), h_c)
        part = g.t() @ h_c
        if grad_w is None:
            grad_w = part.float()
        else:
            grad_w += part
    return grad_w

def compiled_chunk_loop(hh: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                        ignore_index: int, chunk_rows: int, want_h: bool, want_w: bool, h_dtype: torch.dtype,
                        logits_buffer: Callable[[int], torch.Tensor],
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """ChunkedLinearCrossEntropy's loop with chunk_loss_and_logit_grad_ compiled (static shapes) between the GEMMs:
    the rows are cut into equal chunks of at most chunk_rows, the last padded with ignored rows (fewer than the
    number of chunks), so every chunk of a step, and every step of that shape, runs one graph.
    `logits_buffer(rows)` gives the (rows, padded vocab) matmul-dtype buffer each chunk's logits and then gradient
    live in. Returns (summed loss, grad_h, grad_w) as ChunkedLinearCrossEntropy saves them."""
    global _compiled_chunk
    if _compiled_chunk is None:  # here, not at import: importing dynamo costs every CLI start a second
        _compiled_chunk = torch.compile(chunk_loss_and_logit_grad_, dynamic=False)
    rows = hh.shape[0]
    n_chunks = max(1, -(-rows // chunk_rows))
    size = max(1, -(-rows // n_chunks))
    pad = n_chunks * size - rows  # no rows at all: one padded row, so grad_w comes out zeros of its shape
    if pad:
        hh = torch.cat((hh, hh.new_zeros(pad, hh.shape[1])))
        targets = torch.cat((targets, targets.new_full((pad,), ignore_index)))
    buf = logits_buffer(size)
    total = torch.zeros((), dtype=torch.float32, device=hh.device)
    grad_h = torch.empty(hh.shape, dtype=h_dtype, device=hh.device) if want_h else None
    grad_w = None
    for i in range(0, rows + pad, size):
        h_c = hh[i:i + size]
        g = lm_head_logits(h_c, w, buf)
        total += _compiled_chunk(g, targets[i:i + size], vocab_size, ignore_index, want_h or want_w)
        grad_w = backprop_chunk(g, w, h_c, None if grad_h is None else grad_h[i:i + size], grad_w, want_w)
    return total, None if grad_h is None else grad_h[:rows], grad_w
