"""The step's non-GEMM passes that no implementation skips, each timed alone at its shape: with the GEMM floor, the
best share of the floor a step that runs them could reach (issue 23.1's 85 % target, per host).

bench/gemm_floor.py times the step's GEMMs; a step does more than GEMMs, and some of it every trainer must do
however well it fuses the rest: one exp per logit (the softmax of the loss), the optimizer's pass over its state, the
gradient norm for clipping and, with bf16 GEMMs over fp32 weights, each weight cast to bf16 and each weight gradient
brought back to fp32. Each is timed here at its least: the softmax in place over a block of rows that stays in
cache (as model/loss_eager.py runs it, without the copies in and out), AdamW as the trainer's (on CPU with the kernels
pretrain/train/cpu_adamw.py's one pass, which with bf16 GEMMs also writes the weights' casts, so no cast pass of its
own remains; else torch's fused kernel), the norm as the trainer's (pretrain/train/grad_clip.py total_norm), the
casts as copies into kept tensors (no allocation). Everything else a step does (norms, RoPE, SwiGLU, attention's
softmax, residual adds, the loss's copies, Python and autograd) is left out: it could in principle be fused into the
GEMMs. So `ceiling` = floor / (floor + these passes) is an upper bound on the step's share of its floor on this
host, reached only if all the rest cost nothing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def _timed(fn: Callable[[], object], reps: int) -> dict[str, float]:
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus)}


def grad_norm() -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """The trainer's CPU gradient norm, or torch's where pretrain/train/grad_clip.py has none (a --ref checkout)."""
    try:
        from pretrain.train.grad_clip import total_norm
    except ImportError:
        return lambda grads: torch.nn.utils.get_total_norm(grads, 2.0)
    return total_norm


def softmax_rows_per_block(vocab: int) -> int:
    """The loss's CPU softmax block (model/loss_eager.py), or 8 rows where that module is missing (a --ref checkout)."""
    try:
        from model.loss_eager import softmax_block_rows
    except ImportError:
        return 8
    return softmax_block_rows(vocab, torch.get_num_threads())


def adamw(params: list[torch.nn.Parameter], bf16: bool) -> tuple[str, Callable[[], object], bool]:
    """The trainer's update over `params` after its first step: (its name, one step, whether it writes the bf16 casts
    of the weight matrices too). torch's fused AdamW where pretrain/train/cpu_adamw.py's kernel does not apply or is
    missing (a --ref checkout)."""
    try:
        from model import weight_casts
        from pretrain.train import cpu_adamw
        from pretrain.train.cpu_adamw import FusedAdamW
    except ImportError:
        opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
        opt.step()  # state allocated here, as after the trainer's first step
        return "AdamW (fused)", opt.step, False
    opt = FusedAdamW(params, lr=1e-4, weight_decay=0.1, fused=True)
    opt.step()
    if not cpu_adamw.applies(opt):
        return "AdamW (fused)", opt.step, False
    if bf16:
        for p in params:
            if p.dim() >= 2:
                weight_casts.cast_of(p, torch.bfloat16)  # kept: the update writes them
    return ("AdamW + bf16 casts (one pass)" if bf16 else "AdamW (one pass)"), opt.step, bf16


def softmax_in_place(x: torch.Tensor) -> None:
    """The loss's softmax of a block of rows, in place: max, exp, sum and scaling in one pass per row."""
    torch.ops.aten._softmax.out(x, -1, False, out=x)


def pass_floor(shapes: list[torch.Size], rows: int, vocab: int, bf16: bool, reps: int = 5) -> dict:
    """The unavoidable passes of a step over parameters of `shapes` and `rows` x `vocab` logits (module docstring):
    per pass its median wall and CPU seconds over `reps` runs, and their sums. `bf16`: the GEMMs run in bf16 over fp32
    weights, which adds the weights' casts and the weight gradients' conversion."""
    block_rows = min(rows, softmax_rows_per_block(vocab))
    block = torch.randn(block_rows, vocab)
    n_blocks, last = divmod(rows, block_rows)

    def softmax() -> None:
        for _ in range(n_blocks):
            softmax_in_place(block)
        if last:
            softmax_in_place(block[:last])

    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    update_name, update, casts_in_update = adamw(params, bf16)
    grads, norm = [p.grad for p in params], grad_norm()
    passes = {"loss softmax": softmax, update_name: update, "grad norm": lambda: norm(grads)}
    if bf16:
        mats = [p for p in params if p.dim() >= 2]  # what autocast casts: every matmul's weight
        casts = [torch.empty_like(p, dtype=torch.bfloat16) for p in mats]
        grads16 = [torch.randn_like(p, dtype=torch.bfloat16) for p in mats]
        if not casts_in_update:
            passes["weights to bf16"] = lambda: [c.copy_(p.detach()) for c, p in zip(casts, mats, strict=True)]
        passes["weight grads to fp32"] = lambda: [p.grad.copy_(g) for p, g in zip(mats, grads16, strict=True)]
    with torch.no_grad():
        rows_out = [{"name": name, **_timed(fn, reps)} for name, fn in passes.items()]
    return {"rows": rows_out, **{k: sum(r[k] for r in rows_out) for k in ("wall_s", "cpu_s")}}
