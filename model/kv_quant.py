"""Quantized KV caches for decoding: the original research code's block formats (names in kv_formats.py).

A block is min(32, width) values of one token and one head (padded when the width is not a multiple), so
every token's keys and values are quantized once, when they enter the cache; decoupled's semantic and
geometric key halves are quantized apart, each in its own format. q8_0 codes are round(x / s) with
s = absmax / 127, q4_0 round(x / s) in [-8, 7] with s = absmax / 7, nf4 the nearest NormalFloat4 level
(Dettmers et al. 2023, QLoRA appendix E) of x / absmax; s is stored in fp16 and the codes computed with
that rounded s. An optional residual window keeps the newest N tokens also in the model's dtype (a ring
buffer, as the original's "hot" window): reads take those from the ring, the older ones dequantized.

Storage bytes are those of the tensors actually allocated (`nbytes`), so bytes per token are measured.
Reads dequantize the whole cache each step (no fused kernel): a quantized cache saves memory, not time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .kv_formats import KVSetting

BLOCK = 32  # values per quantization block (the original's qblock default)

# NormalFloat4: the 16 quantiles of N(0, 1) normalized to [-1, 1] (QLoRA appendix E / bitsandbytes).
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
              -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
              0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
              0.7229568362236023, 1.0)

FLOAT_FORMATS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANT_FORMATS = {"q8_0": 127.0, "q4_0": 7.0, "nf4": 1.0}  # format -> absmax / scale
DTYPE_FORMAT = {v: k for k, v in FLOAT_FORMATS.items()}


def block_layout(fmt: str, dim: int) -> tuple[int, int]:
    """(values per block, padded dim) of a `dim`-wide row in `fmt`; 4-bit blocks are even (two codes a byte)."""
    qb = min(BLOCK, dim)
    if fmt in ("q4_0", "nf4") and qb % 2:
        qb += 1
    return qb, math.ceil(dim / qb) * qb


def _scales(x: torch.Tensor, fmt: str, qb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., pad) -> (blocks (..., nb, qb) fp32, fp16 scales (..., nb)). Codes are computed with the fp16
    scale itself, so dequantizing with what is stored is exact up to the code's rounding."""
    blocks = x.float().unflatten(-1, (-1, qb))
    scale = (blocks.abs().amax(dim=-1) / QUANT_FORMATS[fmt]).clamp(max=65504.0).to(torch.float16)
    return blocks, scale


def _pack(u: torch.Tensor) -> torch.Tensor:
    """(..., n) uint8 nibbles -> (..., n/2) bytes, the first of each pair in the high nibble."""
    return u[..., 0::2] * 16 + u[..., 1::2]


def _unpack(p: torch.Tensor) -> torch.Tensor:
    return torch.stack((p // 16, p % 16), dim=-1).flatten(-2)


def quantize(x: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x (..., dim) -> (codes, fp16 scales (..., n_blocks)); a float format stores x cast, with no scales."""
    if fmt in FLOAT_FORMATS:
        return x.to(FLOAT_FORMATS[fmt]), None
    dim = x.shape[-1]
    qb, pad = block_layout(fmt, dim)
    blocks, scale = _scales(F.pad(x, (0, pad - dim)), fmt, qb)
    s = scale.float().unsqueeze(-1)
    y = blocks / torch.where(s == 0, 1.0, s)
    if fmt == "q8_0":
        codes = y.round().clamp(-127, 127).to(torch.int8).flatten(-2)
    elif fmt == "q4_0":
        codes = _pack((y.round().clamp(-8, 7) + 8).to(torch.uint8).flatten(-2))
    else:  # nf4: nearest level, found between the midpoints (no (n, 16) distance tensor)
        levels = torch.tensor(NF4_LEVELS, device=x.device)
        idx = torch.bucketize(y.clamp(-1, 1).contiguous(), (levels[1:] + levels[:-1]) / 2)
        codes = _pack(idx.to(torch.uint8).flatten(-2))
    return codes, scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor | None, fmt: str, dim: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The inverse of `quantize` up to its rounding: (..., dim) in `dtype`."""
    if fmt in FLOAT_FORMATS:
        return codes.to(dtype)
    qb, _ = block_layout(fmt, dim)
    if fmt == "q8_0":
        q = codes.float()
    elif fmt == "q4_0":
        q = _unpack(codes).float() - 8
    else:
        q = torch.tensor(NF4_LEVELS, device=codes.device)[_unpack(codes).long()]
    x = q.unflatten(-1, (-1, qb)) * scale.float().unsqueeze(-1)
    return x.flatten(-2)[..., :dim].to(dtype)


class QuantStore:
    """A (B, H, max_len, dim) tensor of one cache, held in `fmt`."""

    def __init__(self, shape: tuple[int, int, int, int], fmt: str, device: torch.device) -> None:
        B, H, L, dim = shape
        self.fmt, self.dim = fmt, dim
        if fmt in FLOAT_FORMATS:
            self.codes = torch.zeros(shape, dtype=FLOAT_FORMATS[fmt], device=device)
            self.scale = None
            return
        qb, pad = block_layout(fmt, dim)
        width, code_dtype = (pad, torch.int8) if fmt == "q8_0" else (pad // 2, torch.uint8)
        self.codes = torch.zeros(B, H, L, width, dtype=code_dtype, device=device)
        self.scale = torch.zeros(B, H, L, pad // qb, dtype=torch.float16, device=device)

    def write(self, start: int, x: torch.Tensor) -> None:
        codes, scale = quantize(x, self.fmt)
        end = start + x.shape[2]
        self.codes[:, :, start:end] = codes
        if self.scale is not None:
            self.scale[:, :, start:end] = scale

    def read(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        scale = None if self.scale is None else self.scale[:, :, start:end]
        return dequantize(self.codes[:, :, start:end], scale, self.fmt, self.dim, dtype)

    def nbytes(self) -> int:
        return self.codes.nbytes + (0 if self.scale is None else self.scale.nbytes)


class QuantKVCache:
    """A layer's KV cache in a KVSetting's formats; the same append/pos contract as attention.KVCache.

    append returns everything stored so far dequantized to the model's dtype: what attention then sees."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, k_dim: int, v_dim: int, device: torch.device,
                 dtype: torch.dtype, setting: KVSetting, sem_dim: int | None = None) -> None:
        self.dtype, self.max_len, self.pos = dtype, max_len, 0
        shape = (batch, n_kv_head, max_len)
        if sem_dim is None:  # one key tensor
            self.k_parts = [(0, k_dim, QuantStore((*shape, k_dim), setting.k, device))]
        else:  # decoupled: [k_s | k_g] per head, each half in its own format
            self.k_parts = [(0, sem_dim, QuantStore((*shape, sem_dim), setting.sem or setting.k, device)),
                            (sem_dim, k_dim, QuantStore((*shape, k_dim - sem_dim), setting.geo or setting.k, device))]
        self.v_store = QuantStore((*shape, v_dim), setting.v, device)
        self.residual = min(setting.residual, max_len)
        self.k_ring = self.v_ring = None
        if self.residual:
            self.k_ring = torch.zeros(batch, n_kv_head, self.residual, k_dim, dtype=dtype, device=device)
            self.v_ring = torch.zeros(batch, n_kv_head, self.residual, v_dim, dtype=dtype, device=device)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.pos, self.pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; {end} requested")
        for a, b, store in self.k_parts:
            store.write(start, k[..., a:b])
        self.v_store.write(start, v)
        if self.residual:
            keep = min(self.residual, end - start)  # only the newest tokens reach the ring
            slots = torch.arange(end - keep, end, device=k.device) % self.residual
            self.k_ring[:, :, slots] = k[:, :, -keep:].to(self.dtype)
            self.v_ring[:, :, slots] = v[:, :, -keep:].to(self.dtype)
        self.pos = end
        return self._read_k(end), self._read(end, self.v_store, self.v_ring)

    def _read_k(self, end: int) -> torch.Tensor:
        split = end - min(self.residual, end)
        old = torch.cat([store.read(0, split, self.dtype) for _, _, store in self.k_parts], dim=-1)
        return self._with_ring(old, end, split, self.k_ring)

    def _read(self, end: int, store: QuantStore, ring: torch.Tensor | None) -> torch.Tensor:
        split = end - min(self.residual, end)
        return self._with_ring(store.read(0, split, self.dtype), end, split, ring)

    def _with_ring(self, old: torch.Tensor, end: int, split: int, ring: torch.Tensor | None) -> torch.Tensor:
        if ring is None or split == end:
            return old
        slots = torch.arange(split, end, device=ring.device) % self.residual
        return torch.cat((old, ring[:, :, slots]), dim=2)

    def nbytes(self) -> int:
        """Bytes of every tensor this cache holds (codes, scales, the residual ring)."""
        ring = 0 if self.k_ring is None else self.k_ring.nbytes + self.v_ring.nbytes
        return sum(store.nbytes() for _, _, store in self.k_parts) + self.v_store.nbytes() + ring


def new_kv_cache(batch: int, n_kv_head: int, max_len: int, k_dim: int, v_dim: int, device: torch.device,
                 dtype: torch.dtype, setting: KVSetting, sem_dim: int | None = None) -> QuantKVCache | None:
    """A QuantKVCache for `setting`, or None when the setting is the model's own cache (attention.KVCache)."""
    if setting.is_plain(DTYPE_FORMAT.get(dtype)):
        return None
    return QuantKVCache(batch, n_kv_head, max_len, k_dim, v_dim, device, dtype, setting, sem_dim)
