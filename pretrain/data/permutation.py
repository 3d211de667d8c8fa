"""A keyed pseudo-random permutation of [0, n) that needs no table: the sampler's epoch order.

A numpy permutation of 78M windows (10B tokens at seq_len 128) would be 625 MB per epoch; this is
O(1) memory, O(1) state (seed, epoch, n) and vectorised: order[i] = FeistelPermutation(n, seed,
epoch)(i). Feistel rounds make a bijection on 2^(2h) >= n values; values that land outside [0, n)
are encrypted again ("cycle walking"), which keeps it a bijection of [0, n).
"""

from __future__ import annotations

import numpy as np

_C1, _C2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


class FeistelPermutation:
    """Keyed bijection of [0, n): a Feistel network on the smallest even-bit power of two >= n,
    cycle-walking values that fall outside [0, n). O(1) memory and state; vectorised."""

    def __init__(self, n: int, seed: int, epoch: int, rounds: int = 6) -> None:
        bits = max(2, (n - 1).bit_length())
        bits += bits & 1
        self.n, self.half = n, np.uint64(bits // 2)
        self.mask = np.uint64((1 << (bits // 2)) - 1)
        ss = np.random.SeedSequence([seed % 2**64, epoch, n])
        self.keys = [np.uint64(k) for k in ss.generate_state(rounds, dtype=np.uint64)]

    def _round_fn(self, r: np.ndarray, k: np.uint64) -> np.ndarray:
        z = r + k  # splitmix64 finaliser: full avalanche of the half-block
        z = (z ^ (z >> np.uint64(30))) * _C1
        z = (z ^ (z >> np.uint64(27))) * _C2
        return (z ^ (z >> np.uint64(31))) & self.mask

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self.half, x & self.mask
        for k in self.keys:
            left, right = right, left ^ self._round_fn(right, k)
        return (left << self.half) | right

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        y = self._encrypt(np.asarray(idx, dtype=np.uint64))
        bad = y >= self.n
        while bad.any():
            y[bad] = self._encrypt(y[bad])
            bad = y >= self.n
        return y.astype(np.int64)
