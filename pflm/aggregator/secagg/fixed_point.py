"""Fixed-point encoding into Z_{2^b} with stochastic rounding; scales chosen so a cohort's sum cannot wrap.

One encoded vector = [update (dim) | weight | aux scalars | clamp counter]. Each device's integers lie in
[−L, L] with L = min(⌊(2^(b−1) − 1) / n⌋, 2^42) for a cohort of n, so any sum of ≤ n devices stays inside
the signed range of Z_{2^b} and decodes exactly. Values beyond their bound are clamped and counted; the
counter is itself summed securely (the server learns only the cohort's total). Both protocol modes call `encode`.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

import numpy as np

from pflm.aggregator.secagg.masking import prg, word_dtype
from pflm.errors import AggregationFailed

MAX_LEVEL = 1 << 42


def rounding_key(run_seed: int | None, round_: int, device_id: int) -> bytes:
    """Key of the stochastic-rounding stream: reproducible from (run seed, round, device), or fresh if seed is None."""
    if run_seed is None:
        return secrets.token_bytes(32)
    return hashlib.sha256(f"pflm-secagg-round|{run_seed}|{round_}|{device_id}".encode()).digest()


class _Scratch:
    """Reused per-codec buffers: fresh 8 MB arrays per device cost more in page faults than the arithmetic."""

    def __init__(self, n: int) -> None:
        self.x = np.empty(n, dtype=np.float64)
        self.u = np.empty(n, dtype=np.float64)
        self.i64 = np.empty(n, dtype=np.int64)
        self.zeros = bytes(4 * n)
        self.stream = bytearray(4 * n + 64)

    def uniform(self, key: bytes) -> np.ndarray:
        """U[0, 1) with 2^-32 resolution from the AES-CTR keystream PRG (a CSPRNG)."""
        enc = prg(key)
        enc.update_into(self.zeros, self.stream)
        words = np.frombuffer(self.stream, dtype=np.uint32, count=self.x.size)
        return np.multiply(words, 2.0**-32, out=self.u, dtype=np.float64)


@dataclass
class Encoded:
    ints: np.ndarray  # word dtype, values in Z_{2^b}
    clamped: int  # coordinates that were outside their bound (clamped)


@dataclass
class Decoded:
    update: np.ndarray  # float64 [dim]
    weight: float
    aux: dict[str, float]
    clamped: int


@dataclass(frozen=True)
class FixedPointCodec:
    bits: int
    cohort_size: int
    dim: int
    value_bound: float
    weight_bound: float
    aux_keys: tuple[str, ...]
    aux_bound: float
    _scratch: list[_Scratch] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.level < 1:
            raise AggregationFailed(
                f"bits={self.bits} is too small for a cohort of {self.cohort_size}: raise aggregation.secagg.bits"
            )

    @property
    def level(self) -> int:
        """L: the largest integer one device may contribute per coordinate.

        Capped at 2^42 so float64 arithmetic in `encode` stays exact with 10 bits to spare for the rounding
        draw (finer steps than 2^-42·C are far below float32 precision anyway; extra bits become headroom).
        """
        return min(((1 << (self.bits - 1)) - 1) // max(self.cohort_size, 1), MAX_LEVEL)

    @property
    def length(self) -> int:
        return self.dim + 2 + len(self.aux_keys)

    @property
    def value_scale(self) -> float:
        return self.level / self.value_bound

    def scales(self) -> np.ndarray:
        s = np.empty(self.length, dtype=np.float64)
        s[: self.dim] = self.value_scale
        s[self.dim] = self.level / self.weight_bound
        s[self.dim + 1 : -1] = self.level / self.aux_bound
        s[-1] = 1.0  # clamp counter: plain integers
        return s

    def quant_error_bound(self, contributors: int) -> float:
        """Worst-case |decoded − exact| per update coordinate of the sum (each rounding errs by < 1 step)."""
        return contributors / self.value_scale

    def encode(self, update: np.ndarray, weight: float, aux: dict[str, float], key: bytes) -> Encoded:
        """Device side: scale, stochastically round (unbiased), clamp to [−L, L], map into Z_{2^b}.

        `key` seeds the rounding stream (see `rounding_key`); equal inputs and keys give equal integers.
        """
        L, d = self.level, self.dim
        if not self._scratch:
            self._scratch.append(_Scratch(self.length))
        sc = self._scratch[0]
        x = sc.x
        np.multiply(update, self.value_scale, out=x[:d], dtype=np.float64)  # not float32 (NEP 50)
        x[d] = weight * (L / self.weight_bound)
        x[d + 1 : -1] = [float(aux.get(k, 0.0)) * (L / self.aux_bound) for k in self.aux_keys]
        x[-1] = 0.0
        # floor(x + u), u ~ U[0,1): rounds up with probability frac(x), so E[result] = x. Float64 keeps
        # u to 2^-(52 - log2 L) resolution (2^-21 for b = 32, 2^-10 at the cap), bounding the bias in steps.
        np.add(x, sc.uniform(key), out=x)
        np.floor(x, out=x)
        clamped = int(np.count_nonzero(x > L)) + int(np.count_nonzero(x < -L))
        if clamped:
            np.clip(x, -L, L, out=x)
        x[-1] = min(clamped, L)
        # float64 → int64 → word: the unsigned cast wraps negatives mod 2^word, which 2^b divides
        np.copyto(sc.i64, x, casting="unsafe")
        ints = sc.i64.astype(word_dtype(self.bits))
        if self.bits not in (32, 64):
            np.bitwise_and(ints, ints.dtype.type((1 << self.bits) - 1), out=ints)
        return Encoded(ints, clamped)

    def to_signed(self, total: np.ndarray) -> np.ndarray:
        """Z_{2^b} → signed int64 in [−2^(b−1), 2^(b−1))."""
        v = total.astype(np.int64) & ((1 << self.bits) - 1)
        v[v >= (1 << (self.bits - 1))] -= 1 << self.bits
        return v

    def decode(self, total: np.ndarray) -> Decoded:
        """Server side: the revealed sum (mod 2^b) → float sums of updates, weights, aux and the clamp count."""
        v = self.to_signed(total).astype(np.float64) / self.scales()
        aux = {k: float(v[self.dim + 1 + i]) for i, k in enumerate(self.aux_keys)}
        return Decoded(v[: self.dim], float(v[self.dim]), aux, int(round(v[-1])))
