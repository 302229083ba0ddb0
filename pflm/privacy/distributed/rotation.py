"""Public random rotation for distributed DP: a permutation, random signs and block Walsh–Hadamard transforms.

Why: rounding and modular summation work best on "flat" vectors (every coordinate ≈ ‖x‖/√D). A random
orthogonal map flattens any fixed vector with high probability (Kairouz, Liu, Steinke 2021, §4.2) and keeps
the L2 norm, so the DP sensitivity is unchanged. pflm uses x ↦ H·S·P·x: P a uniformly random permutation into
the padded length D (a multiple of the block size B, a power of 2), S random ±1 signs, H the orthonormal
Walsh–Hadamard transform applied to each block of B coordinates. The permutation spreads the model's
structured blocks (e.g. the embedding rows of frequent words) over all blocks, so per-block transforms of a
modest size flatten about as well as one transform of the whole vector while padding by < B coordinates.

Public: (P, S) are derived from the run's public seed and the round (`rotation_seed`). Privacy never depends on
the rotation being secret — it is orthogonal (‖Rx‖ = ‖x‖), so the sensitivity of the sum is the same for every
rotation, and modular wrap-around is post-processing of the noisy integer sum. A server that chose an adversarial
rotation could only hurt utility (more wrap-around), which it can do anyway by sending a bad model. A
server-unknown, cohort-known rotation would need one more key-agreement round and buys nothing for privacy.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

DEFAULT_BLOCK = 1 << 17


def rotation_seed(run_seed: int, round_: int) -> bytes:
    """The public 32-byte seed of round `round_`'s rotation (the same on every device and the server)."""
    return hashlib.sha256(f"pflm-ddp-rotation|{int(run_seed)}|{int(round_)}".encode()).digest()


def padded_length(dim: int, block: int = DEFAULT_BLOCK) -> tuple[int, int]:
    """(D, B): the block size B = min(block, next power of 2 ≥ dim) and D = dim rounded up to a multiple of B."""
    if dim < 1:
        raise ValueError("the rotated vector needs at least one coordinate")
    if block < 1 or block & (block - 1):
        raise ValueError(f"rotation block {block} is not a power of 2")
    b = min(block, 1 << max(0, math.ceil(math.log2(dim))))
    return -(-dim // b) * b, b


def _fwht_blocks(y: np.ndarray, b: int) -> None:
    """In place: the orthonormal Walsh–Hadamard transform of each length-b block of y (float64, len % b == 0)."""
    v = y.reshape(-1, b)
    h = 1
    while h < b:
        w = v.reshape(v.shape[0], -1, 2, h)
        a = w[:, :, 0, :].copy()
        w[:, :, 0, :] += w[:, :, 1, :]
        np.subtract(a, w[:, :, 1, :], out=w[:, :, 1, :])
        h *= 2
    y *= 1.0 / math.sqrt(b)


class Rotation:
    """R = H·S·P for one round; `forward` (dim → D) and `inverse` (D → dim) are exact inverses up to float64."""

    def __init__(self, dim: int, seed: bytes, block: int = DEFAULT_BLOCK) -> None:
        self.dim = int(dim)
        self.padded, self.block = padded_length(self.dim, block)
        rng = np.random.Generator(np.random.PCG64(int.from_bytes(seed, "big")))  # public randomness only
        self.perm = rng.permutation(self.padded)  # position in the padded vector of each (padded) coordinate
        self.signs = rng.integers(0, 2, self.padded).astype(np.float64) * 2.0 - 1.0

    def forward(self, x: np.ndarray) -> np.ndarray:
        """R·[x, 0…0] in float64 (length D)."""
        if x.shape != (self.dim,):
            raise ValueError(f"rotation expects a vector of length {self.dim}, got {x.shape}")
        y = np.zeros(self.padded, dtype=np.float64)
        y[self.perm[: self.dim]] = x
        y *= self.signs
        _fwht_blocks(y, self.block)
        return y

    def inverse(self, y: np.ndarray) -> np.ndarray:
        """The first `dim` coordinates of R⁻¹·y = Pᵀ·S·H·y (H is its own inverse), float64."""
        if y.shape != (self.padded,):
            raise ValueError(f"inverse rotation expects a vector of length {self.padded}, got {y.shape}")
        z = np.array(y, dtype=np.float64, copy=True)
        _fwht_blocks(z, self.block)
        z *= self.signs
        return z[self.perm[: self.dim]]
