"""The tied embedding's gradient added straight into the LM head's, instead of a vocab x d_model gradient of its own.

With tied embeddings (model/gpt.py: lm_head.weight is wte.weight) the weight gets two gradients each step: the
chunked loss's dense fp32 one, and the embedding's, which autograd builds as a zero-filled vocab x d_model tensor
(77 MB at config S) with a few thousand rows added, then adds to the first one. Here the loss's backward hands
its gradient to the embedding's backward (a TiedGrad carries it), which adds its rows in place
(index_add_) and returns the sum as the weight's only gradient: no zero fill, no second 77 MB block to fault in,
no 77 MB addition (~35 ms of a ~1.5 CPU-s bf16 step on config S, AVX-512-BF16, 1 thread).

Autograd always runs the loss's backward first (the embedding's output gradient comes out of it). When nothing
was handed over (no chunked loss in this graph, e.g. logits only), the embedding's backward starts from zeros as
autograd's does. The sum differs from autograd's only in rounding order (rows added to the loss's gradient one by
one rather than summed first). GPT uses it on CPU for fp32 weights only: CUDA's index_add_ is nondeterministic
(atomics), while its embedding backward is not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TiedGrad:
    """The LM head's weight gradient on its way from the loss's backward to the embedding's (one forward's)."""

    def __init__(self) -> None:
        self.grad: torch.Tensor | None = None

    def hand_over(self, grad: torch.Tensor) -> None:
        self.grad = grad

    def take(self) -> torch.Tensor | None:
        grad, self.grad = self.grad, None
        return grad


def tied_embedding(idx: torch.Tensor, weight: torch.Tensor, tied: TiedGrad) -> torch.Tensor:
    """F.embedding(idx, weight), whose weight gradient is `tied`'s handed-over gradient plus the looked-up rows'."""
    return _TiedEmbedding.apply(idx, weight, tied)


class _TiedEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx: torch.Tensor, weight: torch.Tensor, tied: TiedGrad) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.tied, ctx.weight_shape, ctx.weight_dtype = tied, weight.shape, weight.dtype
        return F.embedding(idx, weight)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor | None, None]:
        if not ctx.needs_input_grad[1]:
            return None, None, None
        (idx,) = ctx.saved_tensors
        base = ctx.tied.take()
        if base is None:
            base = torch.zeros(ctx.weight_shape, dtype=ctx.weight_dtype, device=grad.device)
        rows = grad.reshape(-1, grad.shape[-1]).to(base.dtype)
        return None, base.index_add_(0, idx.reshape(-1), rows), None
