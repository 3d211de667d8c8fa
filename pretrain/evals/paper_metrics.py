"""The attention instruments of the original decoupled-bottleneck paper's trainer (its v29 `analyze_attention`),
defined as there so figures can be compared with it, as tensors for pretrain/evals/diagnostics.py:

  topk_mass       per row, the sum of its k largest probabilities (null slot included, as the original), mean
                  over rows; k = --analysis-topk (8). Uniform rows over T keys give k/T, one-hot rows 1.
  local_mass      per row, the probability on the keys at positions q-w..q (w+1 keys, the null slot not counted),
                  mean over rows; w = --analysis-local-window (32), the original's window.
  attn_rank       numerical rank of each head's attention matrix over the real tokens (null column dropped) of
                  the first sequence, its first RANK_TOKENS queries and keys (the original analysed up to 256):
                  singular values above s_max * n * eps(fp32), n = RANK_TOKENS (numpy.linalg.matrix_rank's default).
  attn_erank      the original's "attention effective rank" of the same matrix: exp of the entropy of
                  sigma / sum(sigma) (Roy & Vetterli 2007).
  share_sem_msq   the original's semantic share: mean(sem^2) / (mean(sem^2) + mean(geo^2)) of the two paths'
                  scaled logits over every query-key pair of real tokens, future pairs included as the original
                  computed them before masking (ours, sem_share, is summed |score| over visible pairs only).
  stable_rank_X   ||W||_F^2 / ||W||_2^2 of each attention projection weight X (q, k, v, o, q_sem, ...), the
                  spectral norm exact (the original took 8 power iterations, a lower bound, on q / q_sem, q_geo,
                  so its figure can only be higher; its proj_stable_rank_mean is the mean of our q or q_sem/q_geo).

Nothing here allocates another (B, H, T, S) tensor: the band sums walk diagonals (views) and the rank takes a
(H, RANK_TOKENS, RANK_TOKENS) corner, so the planner's diagnostics peak (pretrain/plan/instrument_memory.py) holds.
"""

from __future__ import annotations

import torch
from torch import nn

TOPK = 8  # the original's --analysis-topk
LOCAL_WINDOW = 32  # the original's --analysis-local-window
RANK_TOKENS = 256  # the original's --analysis-max-tokens: rank and maps look at this many leading tokens


def topk_mass(p: torch.Tensor, k: int = TOPK) -> torch.Tensor:
    """(B, H, T, S) probabilities -> (H,) mean over rows of the sum of each row's k largest probabilities."""
    return p.topk(min(k, p.shape[-1]), dim=-1).values.sum(-1).mean(dim=(0, 2))


def local_mass(p: torch.Tensor, window: int = LOCAL_WINDOW, null_slot: bool = False) -> torch.Tensor:
    """(B, H, T, S) -> (H,) mean over rows of the mass on keys q-window..q (query q at position q, null skipped)."""
    off = 1 if null_slot else 0
    real = p[..., off:]
    total = torch.zeros(p.shape[1], dtype=p.dtype, device=p.device)
    for d in range(min(window, real.shape[-2] - 1) + 1):  # d-th diagonal below the main one: key q - d
        total = total + real.diagonal(offset=-d, dim1=-2, dim2=-1).sum(dim=(0, 2))
    return total / (p.shape[0] * p.shape[2])


def corner(p: torch.Tensor, null_slot: bool, tokens: int = RANK_TOKENS, keep_null: bool = False) -> torch.Tensor:
    """The first sequence's (H, n, n[+1]) attention of its first n = min(tokens, T) queries on those keys.

    In causal attention these rows are exactly the attention of the first n tokens on their own."""
    n = min(tokens, p.shape[2])
    off = 1 if null_slot else 0
    return p[0, :, :n, (0 if keep_null else off):off + n]


def rank_and_erank(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, n, m) matrices -> (H,) numerical ranks (numpy's default tolerance) and (H,) effective ranks."""
    s = torch.linalg.svdvals(a.float())
    tol = s.amax(-1, keepdim=True) * max(a.shape[-2:]) * torch.finfo(torch.float32).eps
    rank = (s > tol).sum(-1).float()
    total = s.sum(-1, keepdim=True)
    erank = torch.exp(torch.special.entr(s / total.clamp_min(torch.finfo(torch.float32).tiny)).sum(-1))
    return rank, torch.where(total.squeeze(-1) > 0, erank, 0.0)


def share_msq(sem: torch.Tensor, geo: torch.Tensor, null_slot: bool) -> torch.Tensor:
    """The original's semantic energy share mean(sem^2) / (mean(sem^2) + mean(geo^2)), 0-d (no host sync)."""
    off = 1 if null_slot else 0
    e_sem = torch.linalg.vector_norm(sem[..., off:], dtype=torch.float32).square()
    e_geo = torch.linalg.vector_norm(geo[..., off:], dtype=torch.float32).square()  # same count: means cancel
    total = e_sem + e_geo
    return torch.where(total > 0, e_sem / total.clamp_min(torch.finfo(torch.float32).tiny), 0.0)


def stable_rank(w: torch.Tensor) -> torch.Tensor:
    """||W||_F^2 / ||W||_2^2 of a 2-D weight, 0-d: 1 for rank one, min(shape) for equal singular values."""
    w = w.detach().float()
    # The smaller Gram matrix: trace = ||W||_F^2, top eigenvalue = ||W||_2^2; eigvalsh of it is 2-4x faster than
    # an SVD of W (2048^2: 1.8 s vs 6.5 s, one AVX-512 core) and agrees to fp32 rounding.
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    top = torch.linalg.eigvalsh(gram)[-1]
    return torch.where(top > 0, gram.diagonal().sum() / top.clamp_min(1e-30), 0.0)


def projection_stable_ranks(attn: nn.Module) -> dict[str, torch.Tensor]:
    """stable_rank of every projection of one attention module: {"stable_rank_q": ..., "stable_rank_o": ...}
    (a fused qkv_proj counts as its q, k and v rows, model/attention.py `projections`)."""
    return {f"stable_rank_{name}": stable_rank(w) for name, w in attn.projections().items()}
