"""GPT: a Llama-style decoder (pre-norm RMSNorm, RoPE attention, SwiGLU MLP, no biases).

Token embedding (vocab padded to a multiple of 64) -> n_layer Blocks -> final RMSNorm -> LM head tied
to the embedding by default. The loss is cross-entropy computed in row chunks so that neither the
forward nor the backward pass holds the full (B*T, vocab) fp32 logits.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import is_fake
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from .attention import AttentionTrace, CausalSelfAttention, KVCache, shared_block_mask
from .config import ModelConfig
from .fused import residual_add, rms_norm, rms_norm_reference, swiglu, swiglu_reference
from .kv_formats import KVSetting
from .loss_chunk import compiled_chunk_loop
from .loss_eager import PendingWeightGrad, cast_weight, eager_chunk_loop
from .tied_grad import TiedGrad, tied_embedding

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019), statistics in fp32 whatever the input dtype.

    Eagerly one autograd node (model/fused.py). With `feeds_matmul` (a block's norms: their output only enters a
    projection), under autocast the output is written in the autocast dtype, the cast the projection would make.
    """

    def __init__(self, dim: int, eps: float = 1e-5, feeds_matmul: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.feeds_matmul = feeds_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # inductor fuses the op-by-op form into one kernel
            return rms_norm_reference(x, self.weight, self.eps)
        dev = x.device.type
        cast = self.feeds_matmul and torch.is_autocast_enabled(dev)
        return rms_norm(x, self.weight, self.eps, torch.get_autocast_dtype(dev) if cast else None)


class SwiGLU(nn.Module):
    """MLP of Shazeer 2020 / Llama: down(silu(gate(x)) * up(x)).

    gate and up are one (2 d_ff x d) weight, rows [gate; up]: one GEMM reads x once, forward and backward (dX of
    both in one matmul), instead of two narrower ones. pretrain/llama.py splits it into Llama's gate_proj/up_proj.
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)
        self.down_proj.is_residual_out = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        # Eagerly one autograd node (model/fused.py); inductor fuses the op-by-op form itself.
        return self.down_proj(swiglu_reference(gate_up) if torch.compiler.is_compiling() else swiglu(gate_up))


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, feeds_matmul=True)
        self.attn = cfg.variant.module(cfg)  # the variant's attention (model/variants.py)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, feeds_matmul=True)
        self.mlp = SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None,
                on_trace: Callable[[AttentionTrace], None] | None = None,
                block_mask: BlockMask | None = None) -> torch.Tensor:
        x = residual_add(x, self.attn(self.attn_norm(x), cache, on_trace, block_mask))
        return residual_add(x, self.mlp(self.mlp_norm(x)))


class LossWorkspace:
    """Logit buffers the chunked loss reuses across chunks and steps.

    A chunk of logits at a 50K vocab is hundreds of MB. Allocated afresh each step, glibc serves such
    blocks with mmap and returns them with munmap, so every step page-faults (and zero-fills) them
    again: ~30 % of a CPU step on config S. Kept here, they are faulted in once.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}
        # The weight gradient a forward left pending in a buffer here, until its backward (weak: a graph dropped
        # without a backward takes it along).
        self._pending: weakref.ref[PendingWeightGrad] | None = None

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A (rows, cols) buffer; grows (never shrinks) so phases of a seq-len schedule share one."""
        key = (name, dtype, device)
        buf = self._buffers.get(key)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
            self._buffers.pop(key, None)  # free the old one before allocating the larger one
            buf = self._buffers[key] = torch.empty(max(rows, 0 if buf is None else buf.shape[0]), cols,
                                                   dtype=dtype, device=device)
        return buf[:rows]

    def clear(self) -> None:
        self.settle()
        self._buffers.clear()

    def hold(self, pending: PendingWeightGrad) -> None:
        """`pending` lives in this workspace's buffers until its backward."""
        self._pending = weakref.ref(pending)

    def settle(self) -> None:
        """Before the buffers are reused: a gradient still pending in them (a forward whose backward has not run)
        moves into its own memory."""
        pending = self._pending() if self._pending is not None else None
        if pending is not None:
            pending.settle()
        self._pending = None


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of logits = h @ weight.T, one chunk of rows at a time.

    The gradients are produced in the forward pass, chunk by chunk, while each chunk's logits are at
    hand (softmax - onehot, then two matmuls), so neither pass ever holds more than chunk_rows x vocab
    logits and the LM head matmul is not re-run. Backward only scales the saved gradients (on CPU making the weight
    gradient's last chunk in the same pass: model/loss_eager.py PendingWeightGrad).
    Padded vocab columns (>= vocab_size) are set to -inf: they can never be predicted.
    Matmuls run in the autocast dtype when autocast is on (as F.linear would), softmax in fp32; the
    logit buffers come from `workspace` when given. The eager chunks run model/loss_eager.py (on CPU with kept
    buffers and the softmax in row blocks). With `compiled` (the
    trainer's --compile) they run through model/loss_chunk.py: the same sums, each chunk's softmax and gradient one
    compiled kernel.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                ignore_index: int, chunk_rows: int, compute_grad: bool,
                workspace: LossWorkspace | None, compiled: bool = False, tied: TiedGrad | None = None) -> torch.Tensor:
        want_h, want_w = compute_grad and ctx.needs_input_grad[0], compute_grad and ctx.needs_input_grad[1]
        dev = h.device
        mm_dtype = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else weight.dtype
        kept = _keeps_buffers(h, workspace)
        ws = workspace or LossWorkspace()
        ws.settle()
        # Cast once per call, not per chunk; explicit casts because out= matmuls do not autocast.
        with torch.autocast(dev.type, enabled=False):
            w, hh = cast_weight(weight, mm_dtype, ws.get if kept else None), h.to(mm_dtype)
            if compiled:
                total, grad_h, grad_w = compiled_chunk_loop(
                    hh, w, targets, vocab_size, ignore_index, chunk_rows, want_h, want_w, h.dtype,
                    lambda n: ws.get("logits_mm", n, w.shape[0], mm_dtype, dev))
            else:
                total, grad_h, grad_w = eager_chunk_loop(
                    hh, w, targets, vocab_size, ignore_index, chunk_rows, want_h, want_w, h.dtype,
                    lambda name, n, cols, dtype: ws.get(name, n, cols, dtype, dev), kept)
        ctx.weight_dtype, ctx.tied, ctx.pending = weight.dtype, tied, None
        if isinstance(grad_w, PendingWeightGrad):  # made in backward, scaled in the same pass
            ctx.pending, grad_w = grad_w, None
            ws.hold(ctx.pending)
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if ctx.pending is not None:
            grad_w, ctx.pending = ctx.pending.scaled(grad_total), None
        elif grad_w is not None:  # in place: the saved gradient is ours and backward runs once
            grad_w = grad_w.mul_(grad_total)
        if grad_w is not None:
            grad_w = grad_w.to(ctx.weight_dtype)
            if ctx.tied is not None:  # the tied embedding's backward adds its rows and returns the sum
                ctx.tied.hand_over(grad_w)
                grad_w = None
        return grad_h, grad_w, None, None, None, None, None, None, None, None


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                          ignore_index: int = -100, chunk_rows: int = 2048,
                          workspace: LossWorkspace | None = None, compiled: bool = False,
                          tied: TiedGrad | None = None) -> torch.Tensor:
    """Mean CE of logits = h @ weight.T (columns >= vocab_size excluded) over rows whose target is
    not ignore_index; equals F.cross_entropy on the full logits, NaN when every target is ignored.
    With `tied`, weight's gradient is handed to the tied embedding's backward (model/tied_grad.py)."""
    h, targets = h.reshape(-1, h.shape[-1]), targets.reshape(-1).long()  # gather wants int64
    compute_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    total = ChunkedLinearCrossEntropy.apply(h, weight, targets, vocab_size, ignore_index, chunk_rows,
                                            compute_grad, workspace, compiled, tied)
    return total / (targets != ignore_index).sum()


def _keeps_buffers(h: torch.Tensor, workspace: LossWorkspace | None) -> bool:
    """Whether the chunked loss runs its CPU form (model/loss_eager.py: kept buffers, softmax in row blocks). Not on
    fake tensors: the planner's memory trace (fake cpu tensors for every device, and
    dynamo's tracing) keeps the whole-chunk buffers and per-call casts other devices use."""
    return workspace is not None and h.device.type == "cpu" and not is_fake(h)


# Ops whose outputs selective checkpointing keeps: the matmuls and attention kernels (the FLOPs); everything else
# (norms, activations, rotary, adds) is recomputed in backward, which costs memory bandwidth, not matmul FLOPs.
_SAVED_OPS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
              *(getattr(torch.ops.aten, n).default for n in ("_scaled_dot_product_flash_attention",
                                                             "_scaled_dot_product_flash_attention_for_cpu",
                                                             "_scaled_dot_product_efficient_attention",
                                                             "_scaled_dot_product_cudnn_attention")
                if hasattr(torch.ops.aten, n))}


def _selective_policy(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(policy: str) -> dict[str, Any]:
    """Extra arguments of torch's checkpoint for a policy: "full" recomputes the whole block, "selective" only
    what is not a matmul (torch.utils.checkpoint.create_selective_checkpoint_contexts)."""
    if policy == "full":
        return {}
    if policy == "selective":
        return {"context_fn": lambda: create_selective_checkpoint_contexts(_selective_policy)}
    raise ValueError(f"unknown checkpoint policy {policy!r} (full or selective)")


class GPT(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.grad_checkpoint = False  # recompute each block in backward (saves activation memory)
        self.checkpoint_policy = "full"  # "selective": keep the matmul outputs, recompute only the elementwise ops
        self.loss_chunk_rows = 2048  # rows of logits alive at once in the chunked loss
        self.loss_workspace = LossWorkspace()  # those rows' buffers, kept between steps
        self.compile_loss = False  # each loss chunk one compiled graph (the trainer's --compile)
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # N(0, 0.02) everywhere; projections that write into the residual stream get
        # 0.02/sqrt(2*n_layer) so the residual variance does not grow with depth (GPT-2).
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_out", False):
                std /= math.sqrt(2 * self.config.n_layer)
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, CausalSelfAttention) and module.null_k is not None:
            # A random null key, and a zero null value: attending to "nothing" adds nothing at init.
            nn.init.normal_(module.null_k, mean=0.0, std=0.02)
            nn.init.zeros_(module.null_v)

    def num_params(self) -> int:
        """Real parameter count (tied weights once); equals config.num_params()."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx: torch.Tensor, caches: list[KVCache] | None = None,
                      tied: TiedGrad | None = None) -> torch.Tensor:
        """(B, T) token ids -> (B, T, d) final-normed hidden states; `tied`: see model/tied_grad.py."""
        x = self.wte(idx) if tied is None else tied_embedding(idx, self.wte.weight, tied)
        use_checkpoint = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        # One FlexAttention block mask for every layer (None where they use SDPA); checkpoint's recompute reuses it.
        flex = caches is None and self.config.null_attn
        mask = shared_block_mask(x, True, self._blocks_compiled()) if flex else None
        for i, block in enumerate(self.blocks):
            if caches is not None:
                x = block(x, caches[i])
            elif use_checkpoint:
                x = checkpoint(block, x, block_mask=mask, use_reentrant=False,
                               **checkpoint_kwargs(self.checkpoint_policy))
            else:
                x = block(x, block_mask=mask)
        return self.norm_f(x)

    def _blocks_compiled(self) -> bool:
        """Whether the blocks run as compiled graphs now: the whole model is being compiled, or the blocks were
        compiled in place (Module.compile, pretrain/train/speed.py) and no force_eager stance is set."""
        if torch.compiler.is_compiling():
            return True
        return getattr(self.blocks[0], "_compiled_call_impl", None) is not None and not _force_eager()

    def trace_attention(self, idx: torch.Tensor,
              on_layer: Callable[[int, AttentionTrace, torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
        """Forward through the reference attention path: on_layer(i, trace, x_in, x_out) is called per block
        with its AttentionTrace and the residual stream before and after it. Returns final-normed hidden states.

        Calls Block.forward directly, so a block compiled in place (Module.compile) runs eagerly here.
        """
        x = self.wte(idx)
        for i, block in enumerate(self.blocks):
            traces: list[AttentionTrace] = []
            out = block.forward(x, on_trace=traces.append)
            on_layer(i, traces[0], x, out)
            x = out
        return self.norm_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                ignore_index: int = -100) -> torch.Tensor:
        """Logits (B, T, vocab_size) without targets; mean cross-entropy (scalar) with them."""
        if idx.shape[1] > self.config.block_size:
            raise ValueError(f"sequence length {idx.shape[1]} exceeds block_size={self.config.block_size}")
        tied = TiedGrad() if targets is not None and self._hands_over_tied_grad() else None
        h = self.hidden_states(idx, tied=tied)
        if targets is None:
            return self.lm_head(h)[..., : self.config.vocab_size]
        return chunked_cross_entropy(h, self.lm_head.weight, targets, self.config.vocab_size,
                                     ignore_index, self.loss_chunk_rows,
                                     # CUDA's caching allocator already reuses blocks; glibc does not.
                                     self.loss_workspace if h.device.type == "cpu" else None,
                                     self.compile_loss and not _force_eager(), tied)

    def _hands_over_tied_grad(self) -> bool:
        """Whether the loss hands the tied weight's gradient to the embedding's backward (model/tied_grad.py):
        eager CPU training with tied fp32 weights (CUDA's index_add_ is nondeterministic). Not on fake tensors: the
        planner's memory trace runs on fake cpu tensors for every device, and on CUDA autograd's path stays (on CPU
        the estimate then holds one vocab x d gradient too many)."""
        w = self.wte.weight
        return (w is self.lm_head.weight and w.requires_grad and torch.is_grad_enabled() and w.device.type == "cpu"
                and w.dtype == torch.float32 and not torch.compiler.is_compiling() and not is_fake(w))

    def new_caches(self, batch: int, max_len: int, kv_cache: KVSetting | None = None) -> list[KVCache]:
        """One KV cache per layer in the model's dtype, or in `kv_cache`'s formats (model/kv_quant.py)."""
        p = next(self.parameters())
        return [b.attn.new_cache(batch, max_len, p.device, p.dtype, kv_cache) for b in self.blocks]

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, kv_cache: KVSetting | None = None) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T); temperature 0 means greedy."""
        new = list(self.stream(idx, max_new_tokens, temperature, top_k, kv_cache))
        return torch.cat((idx, *new), dim=1)

    @torch.no_grad()
    def stream(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
               top_k: int | None = None, kv_cache: KVSetting | None = None) -> Iterator[torch.Tensor]:
        """Yield max_new_tokens sampled (B, 1) tokens one at a time, continuing idx (B, T).

        Uses a KV cache of block_size tokens (in `kv_cache`'s formats when given). Once the sequence outgrows
        it, the cache is rebuilt from the last block_size tokens (the same context a cropping full recompute
        would see).
        """
        block_size = self.config.block_size
        caches: list[KVCache] | None = None
        for _ in range(max_new_tokens):
            if caches is None or caches[0].pos >= block_size:
                context = idx[:, -block_size:]
                caches = self.new_caches(idx.shape[0], block_size, kv_cache)
            else:
                context = idx[:, -1:]
            logits = self.lm_head(self.hidden_states(context, caches)[:, -1])[:, : self.config.vocab_size]
            token = sample(logits.float(), temperature, top_k)
            idx = torch.cat((idx, token), dim=1)
            yield token


def _force_eager() -> bool:
    """Whether torch.compiler.set_stance("force_eager") is on (pretrain/train/speed.py's `eagerly`): compiled code
    runs its Python then, so the compiled loss would run its allocating form and the blocks would not use flex."""
    if "torch._dynamo" not in sys.modules:  # nothing compiled in this process
        return False
    return getattr(getattr(sys.modules["torch._dynamo"].eval_frame, "_stance", None), "stance", "") == "force_eager"


def sample(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) token ids; temperature 0 is argmax."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
