"""Attention on CPU as blocked GEMMs and fused softmax passes, or one kernel call, one autograd node (issue 23.1).

Why: torch's CPU flash-attention kernel (what scaled_dot_product_attention runs on CPU) spends most of its time
outside the GEMMs it does. At config S (B 8, H 6, T 256, head 64, bf16, AVX-512-BF16) its forward + backward took
~40 CPU-ms per layer against ~7 for the six attention matmuls at full T x T; the backward ~70 % of it. Here the
same attention is a few whole-batch GEMMs (oneDNN) and row-wise fused passes per block of 64 queries: ~0.5-0.65x
its CPU time for every variant (bench/attention_cpu.py; the figures are in bench/README.md).

Causal blocks: a block of queries reads only the keys up to its last query (4 blocks at T 256: 5/8 of the T x S
work), only the diagonal square gets a -inf bias, and the block's scores stay in cache between the GEMM, the
softmax and the GEMM that use them. T not a multiple of 64 (and above it) keeps SDPA, so a block stays bounded.

Precision is the flash kernel's: the scores q k^T and the backward's dO v^T are fp32 sums of exact bf16 products
(autocast's bf16 GEMM would round every score to 8 bits before the softmax), the softmax and its backward are
fp32, and the probabilities / score gradients enter the bf16 GEMMs P v, P^T dO, dS k, dS^T q rounded to bf16, as
flash rounds them; dK and dV sum over query blocks in fp32. Memory is flash's: forward saves q, k, v; backward
recomputes each block's probabilities (bit-identical to the blocked forward's: same GEMM, same softmax; equal to the
flash forward's within fp32 rounding). No T x S tensor outlives a block. The score GEMMs read K and V transposed
once per call ((B*Hkv, d, S) fp32), so no call copies its operand.

The kernel (model/csrc/cpu_attention.cpp, where the library is built for AVX-512-BF16): causal self-attention with
head dims multiples of 16 and no AMX, the same blocks and arithmetic in one call each way, with no torch op, operand
copy or fp32 <-> bf16 conversion per block: forward + backward ~9 CPU-ms a layer at config S (1 thread) against ~18
for the blocks below and ~37 for flash, near the ~8 the GEMM floor charges for the six attention GEMMs at full T x T.

Per host (amx_tiles): with AMX tiles the forward is SDPA's flash kernel itself (its forward uses AMX and beat the
blocks ~2.5x; its backward did not) and the fp32 score GEMMs run as plain fp32 GEMMs; without AMX the blocked
forward and oneDNN's bf16 mode below were the faster ones. Config S, AMX host, 1 thread: forward + backward ~39
CPU-ms a layer against ~49 for the all-blocked form and ~44 for flash (bench/README.md).

GQA (fewer k/v heads): each k/v head's query group is stacked along a block's rows, so one GEMM serves the group
and k/v are never repeated.

fp32 (the native precision of AVX2 hosts, where the planner's cpu tier trains in fp32): causal self-attention is one
call each way into the library's fp32 kernel (model/csrc/cpu_attention_f32.cpp, built for AVX2 + FMA without
AVX-512): the same blocks with fp32 FMA tiles, 0.55-0.66x the flash kernel's CPU time at config S on Zen 2 (28-30
CPU-ms a layer call against 43-46; GQA 23-24 against 40-43). Other fp32 attention (a mask, a cache offset, an
AVX-512 build) keeps SDPA: the blocks below rely on bf16 operands (exact products in oneDNN's bf16 mode).

Where it runs (cpu_attention_applies): bf16 plain CPU tensors, eager, outside every dispatch mode, on a host with
native bf16 GEMMs; fp32 where the fp32 kernel applies. Under FakeTensorMode / the memory tracker (the planner's CUDA
memory estimate, pretrain/plan/step_trace.py), under selective checkpointing's caching mode, a single query
(decoding) and on every other device, attention stays torch's SDPA: the memory a trace models and everything a GPU
runs are unchanged. While it runs (without AMX) it sets oneDNN's fp32 matmul
precision to bf16 (process-wide, restored after; its fp32 operands are exact bf16 values, so nothing is rounded).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from .cpu_gemms import attention_applies, attention_backward, attention_forward

# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA, older name DNNL_MAX_CPU_ISA) below which it has no bf16 dot product, and
# below which it has no AMX: a capped process (an emulated host, bench/train_step.py --isa) runs as that host would.
_CAPS_WITHOUT_BF16 = frozenset({"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"})
_CAPS_WITHOUT_AMX = _CAPS_WITHOUT_BF16 | {"AVX512_CORE_BF16", "AVX10_1_512", "AVX512_CORE_FP16", "AVX10_2_512"}


def _onednn_cap() -> str:
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()


@functools.cache
def native_bf16() -> bool:
    """Whether oneDNN multiplies bf16 natively on this CPU: a bf16 dot product (AVX512-BF16 or AMX) in the hardware
    and not capped away. oneDNN's own check (torch.ops.mkldnn._is_mkldnn_bf16_supported) says yes for any AVX-512
    CPU, where bf16 only converts to fp32 (Skylake, Cascade Lake, Ice Lake servers): capped to AVX512_CORE, a bf16
    2048^3 matmul ran 42 GFLOP/s against fp32's 193 on an AMX host. Where it is not native, bf16 is ~4x slower per
    tiny training step and ~20x per large matmul than fp32. The one answer this path, the trainer's device record,
    the planner's cpu tier and the benches use (pretrain/train/device.py: cpu_has_fast_bf16)."""
    try:
        supported = torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False
    return supported and _onednn_cap() not in _CAPS_WITHOUT_BF16 and _hardware_has("avx512_bf16", "amx_tile")


def _hardware_has(*features: str) -> bool:
    """Whether the CPU has any of these (torch.cpu's cpuinfo queries: _is_avx512_bf16_supported, ...)."""
    for feature in features:
        query = getattr(torch.cpu, f"_is_{feature}_supported", None)
        if query is not None and query():
            return True
    return False


def cpu_attention_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> bool:
    """True where causal_attention_cpu replaces SDPA (module docstring): eager, no dispatch mode active, more than
    one query, T at most one block or a multiple of it, and plain bf16 CPU tensors on a host with native bf16 GEMMs,
    or fp32 causal self-attention (no mask, as many keys as queries) the library's fp32 kernel computes."""
    T = q.shape[2]
    if (torch.compiler.is_compiling() or q.device.type != "cpu" or T == 1 or (T > BLOCK_QUERIES and _n_blocks(T) == 1)
            or is_in_torch_dispatch_mode()):
        return False
    if q.dtype == torch.float32:
        return mask is None and k.shape[2] == T and attention_applies(q, k, v)
    return all(type(t) is torch.Tensor and t.dtype == torch.bfloat16 for t in (q, k, v)) and native_bf16()


def causal_attention_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float | None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v for bf16 q (B, H, T, hd), k (B, Hkv, S, hd), v (B, Hkv, S, hd_v), or fp32
    ones where cpu_attention_applies (causal, mask None).

    mask (T, S) bool, True = may attend, or None for causal with queries at the last T key positions (S == T in
    training). scale None = 1/sqrt(hd). Returns (B, H, T, hd_v) in q's dtype."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    T, S = q.shape[2], k.shape[2]
    causal = mask is None and S == T  # SDPA's is_causal aligns queries with the first keys
    if q.dtype == torch.float32:  # only the fp32 kernel's case gets here (cpu_attention_applies)
        return _KernelAttention.apply(q, k, v, scale)
    if causal and not amx_tiles() and attention_applies(q, k, v):
        return _KernelAttention.apply(q, k, v, scale)
    group = q.shape[1] // k.shape[1]
    if mask is None:
        blocks = _causal_blocks(T, S, group, q.device)
        mask = None if causal else _causal_mask(T, S, q.device)  # only the flash forward reads it, and not if causal
    else:
        blocks = _blocks(mask, group, _n_blocks(T))
    return _CausalAttention.apply(q, k, v, mask, blocks, causal, scale)


def _causal_mask(T: int, S: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool, True = may attend: queries at the last T of S key positions."""
    return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)


@functools.lru_cache(maxsize=8)
def _causal_blocks(T: int, S: int, group: int, device: torch.device) -> list[tuple[int, int, torch.Tensor | None]]:
    """The implicit causal mask's blocks (_blocks), made once per shape, not per layer call and again in its
    backward (~1 CPU-ms a layer at config S). Only the blocks are kept (each bias at most 64 x 64 per head in a
    group), not the T x S mask; their bias tensors are only read."""
    return _blocks(_causal_mask(T, S, device), group, _n_blocks(T))


@functools.cache
def amx_tiles() -> bool:
    """Whether this CPU has AMX tiles (Sapphire Rapids and later), which changes two choices here (issue 23.1,
    bench/attention_cpu.py, config S, 1 thread): the forward is SDPA's flash kernel, whose GEMMs run on AMX (~6
    CPU-ms per layer against ~15 for the blocked forward; its backward stays slower than the blocks, ~50 vs ~37),
    and the fp32 score GEMMs run as plain fp32 GEMMs (oneDNN's bf16 mode converts the operands per call: 1.5x
    slower there). Without AMX (AVX-512-BF16 only) the blocked forward and the bf16 mode were the faster ones."""
    if _onednn_cap() in _CAPS_WITHOUT_AMX:
        return False
    try:
        return bool(torch._C._cpu._init_amx())
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def _exact_bf16_products() -> Iterator[None]:
    """fp32 GEMMs computed by oneDNN from bf16 products with fp32 accumulation and fp32 output. The operands here
    are bf16 values held in fp32, so nothing is rounded: the same sums as an fp32 GEMM, at ~3x its speed without AMX
    (with AMX plain fp32 GEMMs are faster: amx_tiles)."""
    mm = torch.backends.mkldnn.matmul
    before = mm.fp32_precision
    mm.fp32_precision = before if amx_tiles() else "bf16"
    try:
        with torch.autocast("cpu", enabled=False):  # the bf16 GEMMs here choose their dtypes themselves
            yield
    finally:
        mm.fp32_precision = before


# Queries per block (T a multiple of it, else one block); a block's fp32 scores are 3 MB at config S.
BLOCK_QUERIES = 64


def _n_blocks(T: int) -> int:
    return T // BLOCK_QUERIES if T % BLOCK_QUERIES == 0 else 1


def _block_rows(x: torch.Tensor, n_kv: int, nb: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, T, d), any strides -> contiguous (nb, B*Hkv, rows, d) in `dtype`, one copy: block i's rows are its
    positions x the query heads of one k/v head, ordered (position, head in group), so each k/v head serves its
    whole group in one GEMM (SDPA's enable_gqa: query head h uses k/v head h // group) and a block's operand is
    contiguous (bmm copies a strided one first)."""
    B, H, T, d = x.shape
    g = H // n_kv
    src = x.unflatten(1, (n_kv, g)).unflatten(3, (nb, T // nb)).permute(3, 0, 1, 4, 2, 5)
    return torch.empty(src.shape, dtype=dtype, device=x.device).copy_(src).view(nb, B * n_kv, (T // nb) * g, d)


def _unblock(xb: torch.Tensor, B: int, H: int, heads_outer: bool) -> torch.Tensor:
    """_block_rows' inverse: (nb, B*Hkv, rows, d) -> (B, H, T, d), one copy, laid out (B, H, T, d) in memory or,
    with heads_outer False, (B, T, H, d) (SDPA's CPU output layout: the caller's transpose(1, 2).reshape is a view)."""
    nb, N, R, d = xb.shape
    n_kv = N // B
    g = H // n_kv
    src = xb.view(nb, B, n_kv, R // g, g, d)  # (block, B, kv head, position in block, head in group, d)
    if heads_outer:
        out = torch.empty(B, n_kv, g, nb, R // g, d, dtype=xb.dtype, device=xb.device)
        return out.copy_(src.permute(1, 2, 4, 0, 3, 5)).view(B, H, nb * R // g, d)
    out = torch.empty(B, nb, R // g, n_kv, g, d, dtype=xb.dtype, device=xb.device)
    return out.copy_(src.permute(1, 0, 3, 2, 4, 5)).view(B, nb * R // g, H, d).transpose(1, 2)


def _blocks(mask: torch.Tensor, group: int, nb: int) -> list[tuple[int, int, torch.Tensor | None]]:
    """Per query block of a (T, S) mask: (keys to read, first masked key, fp32 bias of the keys from there or
    None). A block reads keys up to its rows' last visible one; its bias (0 visible, -inf masked; rows (position,
    head in group)) covers only the keys from the first one any of its rows may not see (causal: the block's
    diagonal square), so the score GEMM's output is not filled with a broadcast bias first."""
    T, S = mask.shape
    last = torch.where(mask, torch.arange(1, S + 1, device=mask.device), 0).amax(dim=1).tolist()
    out = []
    for t0 in range(0, T, T // nb):
        t1 = t0 + T // nb
        keys = max(1, max(last[t0:t1]))
        hidden = ~mask[t0:t1, :keys]
        first, bias = keys, None
        if bool(hidden.any()):
            first = int(hidden.any(dim=0).nonzero()[0])
            bias = torch.zeros(hidden[:, first:].shape, dtype=torch.float32, device=mask.device)
            bias.masked_fill_(hidden[:, first:], float("-inf"))
            bias = bias.repeat_interleave(group, dim=0) if group > 1 else bias
        out.append((keys, first, bias))
    return out


def _gemm_f32(a32: torch.Tensor, bt32: torch.Tensor, scale: float) -> torch.Tensor:
    """fp32 scale * a @ bt for a (N, R, K), bt (N, K, C) holding bf16 values: exact products, fp32 sums, the scale
    applied to the sums by the GEMM itself. bt is a column slice of a contiguous (N, K, S) tensor: oneDNN reads it
    in place, where a transposed (N, C, K) operand was first copied whole by every call (issue 23.1, AMX host)."""
    out = torch.empty(a32.shape[0], a32.shape[1], bt32.shape[2], dtype=torch.float32, device=a32.device)
    return torch.baddbmm(out, a32, bt32, beta=0.0, alpha=scale, out=out)


def _probs(q32: torch.Tensor, kt32: torch.Tensor, first: int, bias: torch.Tensor | None,
           scale: float) -> torch.Tensor:
    """fp32 softmax(scale * q k^T + bias) of one block, q32 (N, rows, d), kt32 (N, d, keys): the score GEMM, the
    bias added to keys first: on, then the softmax in place (one fused pass per row: max, exp, sum and scaling while
    the row is in cache; masked -inf scores cost nothing extra there)."""
    s = _gemm_f32(q32, kt32, scale)
    if bias is not None:
        s[:, :, first:].add_(bias)
    return torch.ops.aten._softmax.out(s, -1, False, out=s)


def _f32_t(x: torch.Tensor) -> torch.Tensor:
    """k or v (B, Hkv, S, d), any strides, as contiguous fp32 (B*Hkv, d, S), the layout the score GEMMs read in
    place: one pass."""
    B, n, S, d = x.shape
    return torch.empty(B, n, d, S, dtype=torch.float32, device=x.device).copy_(x.transpose(2, 3)).view(B * n, d, S)


def _sdpa_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool,
                  scale: float) -> torch.Tensor:
    """SDPA's own forward (the CPU flash kernel) of the same attention, bit for bit what the model ran before."""
    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                              scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _accumulate(total: torch.Tensor | None, part: torch.Tensor, keys: int) -> torch.Tensor:
    """total (N, keys, d) fp32 plus part (N, part's keys, d) over its first keys. The first part, if it spans every
    key, becomes the total (one conversion instead of a zero fill and an add: ~2 of the backward's ~30 CPU-ms at
    config S, where the last query block reads all keys)."""
    if total is None:
        if part.shape[1] == keys:
            return part.float()
        total = torch.zeros(part.shape[0], keys, part.shape[2], dtype=torch.float32, device=part.device)
    total[:, :part.shape[1]] += part
    return total


class _CausalAttention(torch.autograd.Function):
    """Forward saves q, k, v (as SDPA's flash kernel does, without its output); backward recomputes each block's
    probabilities from them, so no block's T x S tensor outlives its block. The forward is the blocked one below,
    or on an AMX host SDPA's flash kernel itself (amx_tiles: there it is ~2.5x faster than the blocks)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                blocks: list[tuple[int, int, torch.Tensor | None]], causal: bool, scale: float) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.blocks, ctx.scale = blocks, scale
        if amx_tiles():
            return _sdpa_forward(q, k, v, mask, causal, scale)
        B, H, T, _ = q.shape
        n_kv = k.shape[1]
        nb = len(blocks)
        q32, kt32, v16 = _block_rows(q, n_kv, nb, torch.float32), _f32_t(k), v.flatten(0, 1)
        out = torch.empty(q32.shape[:-1] + v.shape[-1:], dtype=v.dtype, device=v.device)
        with _exact_bf16_products():
            for i, (keys, first, bias) in enumerate(blocks):
                p = _probs(q32[i], kt32[:, :, :keys], first, bias, scale)
                torch.bmm(p.to(v.dtype), v16[:, :keys], out=out[i])
        return _unblock(out, B, H, heads_outer=False)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v = ctx.saved_tensors
        scale = ctx.scale
        B, H = q.shape[:2]
        n_kv = k.shape[1]
        blocks = ctx.blocks
        nb = len(blocks)
        q16, do16 = _block_rows(q, n_kv, nb, q.dtype), _block_rows(grad, n_kv, nb, v.dtype)
        q32, do32 = q16.float(), do16.float()
        k16, kt32, vt32 = k.flatten(0, 1), _f32_t(k), _f32_t(v)
        S = k.shape[2]
        # dK, dV sum over query blocks in fp32 (widest block first: it starts the sums); each dQ row is one block's.
        dk = dv = None
        dq = torch.empty(q16.shape, dtype=q.dtype, device=q.device)
        with _exact_bf16_products():
            for i in sorted(range(nb), key=lambda i: -blocks[i][0]):
                keys, first, bias = blocks[i]
                p = _probs(q32[i], kt32[:, :, :keys], first, bias, scale)
                dv = _accumulate(dv, torch.bmm(p.to(v.dtype).transpose(1, 2), do16[i]), S)
                # fp32 GEMM: dS takes dP minus its row mean, which cancels; the score scale applied to its sums.
                dp = _gemm_f32(do32[i], vt32[:, :, :keys], scale)
                ds = torch.ops.aten._softmax_backward_data.out(dp, p, -1, torch.float32, grad_input=dp).to(q.dtype)
                torch.bmm(ds, k16[:, :keys], out=dq[i])
                dk = _accumulate(dk, torch.bmm(ds.transpose(1, 2), q16[i]), S)
        return (_unblock(dq, B, H, heads_outer=True), dk.to(k.dtype).view(k.shape), dv.to(v.dtype).view(v.shape),
                None, None, None, None)


class _KernelAttention(torch.autograd.Function):
    """Causal self-attention as one library call each way (model/csrc/cpu_attention.cpp: the blocks' arithmetic
    without their torch ops and copies); saves q, k, v, as the blocks do."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return attention_forward(q, k, v, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v = ctx.saved_tensors
        return (*attention_backward(q, k, v, grad, ctx.scale), None)
