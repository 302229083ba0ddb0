"""Shamir t-of-n secret sharing over the Mersenne prime field 2^521 − 1 (holds 32-byte secrets as one element)."""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from functools import lru_cache

PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)


def split(secret: int, xs: Sequence[int], threshold: int) -> dict[int, int]:
    """Shares y = f(x) of a random degree-(threshold−1) polynomial with f(0) = secret, one per x in xs."""
    if not 0 <= secret < PRIME:
        raise ValueError("secret out of field range")
    if threshold < 1 or threshold > len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share x-coordinates must be distinct and non-zero")
    coeffs = [secret] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    coeffs.reverse()
    out: dict[int, int] = {}
    for x in xs:
        y = 0
        for c in coeffs:
            y = (y * x + c) % PRIME
        out[x] = y
    return out


@lru_cache(maxsize=4096)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """λ_i = Π_{j≠i} x_j / (x_j − x_i) mod p. The x's are small, so products stay exact integers and
    one batched modular inverse (Montgomery's trick) serves all denominators."""
    total = math.prod(xs)
    dens = [math.prod(xj - xi for xj in xs if xj != xi) % PRIME for xi in xs]
    prefix = [1]
    for d in dens:
        prefix.append(prefix[-1] * d % PRIME)
    inv = pow(prefix[-1], -1, PRIME)
    inverses = [0] * len(xs)
    for i in range(len(xs) - 1, -1, -1):
        inverses[i] = inv * prefix[i] % PRIME
        inv = inv * dens[i] % PRIME
    return tuple((total // xi) % PRIME * w % PRIME for xi, w in zip(xs, inverses))


def reconstruct(shares: Mapping[int, int], threshold: int) -> int:
    """f(0) from the `threshold` shares with the smallest x (raises ValueError if there are fewer)."""
    if len(shares) < threshold:
        raise ValueError(f"{len(shares)} shares, need {threshold}")
    xs = tuple(sorted(shares)[:threshold])
    lam = _lagrange_at_zero(xs)
    return sum(shares[x] * c for x, c in zip(xs, lam)) % PRIME


def to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def from_bytes(b: bytes) -> int:
    y = int.from_bytes(b, "big")
    if y >= PRIME:
        raise ValueError("share out of field range")
    return y
