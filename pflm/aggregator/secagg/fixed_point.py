"""Fixed-point encoding into Z_{2^b} with stochastic rounding; scales chosen so a cohort's sum cannot wrap.

One encoded vector = [update (dim) | weight | aux scalars | clamp counter]. Each device's integers lie in
[−L, L] with L = min(⌊(2^(b−1) − 1) / n⌋, 2^42) for a cohort of n, so any sum of ≤ n devices stays inside
the signed range of Z_{2^b} and decodes exactly. Values beyond their bound are clamped and counted; the
counter is itself summed securely (the server learns only the cohort's total). Both protocol modes call `encode`.

Sensitivity. Rounding moves each update coordinate by less than one step 1/value_scale, so it can push a clipped
update of norm C up to C + √d/value_scale: the DP sensitivity would silently grow. `shrink_factor` (computed by
the device before encoding and applied inside the encoder, in float64) scales the update to norm ≤ bound −
`rounding_slack()`, which makes the decoded contribution's norm ≤ bound for EVERY rounding outcome. Clamping to [−L, L] only moves a coordinate towards
zero (never raises the norm), and L·n < 2^(b−1) keeps any sum of ≤ n devices from wrapping modulo 2^b.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pflm.aggregator.secagg.masking import prg, run_ranges, word_dtype
from pflm.errors import AggregationFailed, ConfigError

MAX_LEVEL = 1 << 42
# |encoded − value·scale| < 1 + ROUNDING_MARGIN in integer units: < 1 for exact arithmetic (floor(y + u), u < 1),
# plus float64 rounding of y = value·scale and of y + u (≤ 2 · 2^-53 · 2^42 = 2^-10 at the level cap).
ROUNDING_MARGIN = 2.0**-8
SLACK_LIMIT = 0.01  # largest rounding slack accepted, as a fraction of the clip bound
CHUNK = 1 << 16  # values per chunk of `encode` (a multiple of the 4 rounding uniforms per AES block)


def rounding_key(run_seed: int | None, round_: int, device_id: int) -> bytes:
    """Key of the stochastic-rounding stream: fresh from the OS CSPRNG if seed is None (the default `urandom`
    mode), else SHA-256 of (run seed, round, device) — reproducible but NOT secret (`rounding="seeded"`)."""
    if run_seed is None:
        return secrets.token_bytes(32)
    return hashlib.sha256(f"pflm-secagg-round|{run_seed}|{round_}|{device_id}".encode()).digest()


def _norm64(x: np.ndarray) -> float:
    """L2 norm accumulated in float64, chunk by chunk (exact squares of float32 values, no big temporaries)."""
    acc = 0.0
    for lo in range(0, x.size, CHUNK):
        seg = x[lo : lo + CHUNK].astype(np.float64)
        acc += float(np.dot(seg, seg))
    return math.sqrt(acc)


class _Scratch:
    """One thread's chunk buffers (float64 values, uniforms, keystream), reused for every device."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.x = np.empty(n, dtype=np.float64)
        self.u = np.empty(n, dtype=np.float64)
        self.zeros = bytes(4 * n)
        self.stream = bytearray(4 * n + 64)

    def uniform(self, enc, m: int) -> np.ndarray:
        """The next m draws of U[0, 1) with 2^-32 resolution from a CSPRNG keystream (AES-CTR)."""
        enc.update_into(self.zeros[: 4 * m], self.stream)
        words = np.frombuffer(self.stream, dtype=np.uint32, count=m)
        return np.multiply(words, 2.0**-32, out=self.u[:m], dtype=np.float64)


_LOCAL = threading.local()


def _scratch(n: int) -> _Scratch:
    sc = getattr(_LOCAL, "scratch", None)
    if sc is None or sc.n < n:
        sc = _LOCAL.scratch = _Scratch(n)
    return sc


class ChunkEncoder:
    """Encodes one device's vector chunk by chunk, in any order and from several threads.

    `filler(lo)` returns a function that writes the encoding of the next `len(out)` coordinates (from `lo` on)
    into `out`; ranges must start on a multiple of 4 (one AES block of rounding uniforms). The counter slot is
    written as 0: the caller adds `clamped` once every chunk is done (masks are additive, so this may come last).
    """

    def __init__(self, codec: FixedPointCodec, update: np.ndarray, weight: float, aux: dict[str, float], key: bytes,
                 scale: float = 1.0):
        L, d = codec.level, codec.dim
        if update.shape != (d,):
            raise AggregationFailed(f"update of shape {update.shape} does not match the round's dimension {d}")
        self.codec, self.update, self.key = codec, update, key
        self.value_scale = codec.value_scale * float(scale)  # the shrink factor fused in (no scaled copy)
        self.tail = np.empty(codec.length - d, dtype=np.float64)
        self.tail[0] = weight * (L / codec.weight_bound)
        self.tail[1:-1] = [float(aux.get(k, 0.0)) * (L / b) for k, b in zip(codec.aux_keys, codec.aux_bound_list)]
        self.tail[-1] = 0.0
        self.clamped = 0
        self.finite = True
        self._lock = threading.Lock()
        self._signed = np.int32 if codec.bits <= 32 else np.int64  # |values| ≤ L < 2^(b−1): two's complement = mod 2^word

    def filler(self, lo: int) -> Callable[[np.ndarray], None]:
        d, L = self.codec.dim, self.codec.level
        if lo % 4:
            raise ValueError("chunk ranges must start on a multiple of 4 coordinates")
        enc = prg(self.key, lo // 4)  # 4 uniform words per AES block
        pos = lo

        def fill(out: np.ndarray) -> None:
            nonlocal pos
            start, m = pos, out.size
            pos += m
            sc = _scratch(m)
            x = sc.x[:m]
            end = min(start + m, d)
            if end > start:  # the update's coordinates, widened to float64 first (not float32 arithmetic)
                np.copyto(x[: end - start], self.update[start:end])
                np.multiply(x[: end - start], self.value_scale, out=x[: end - start])
            if start + m > d:  # weight, aux scalars and the clamp counter's slot
                x[max(d - start, 0) :] = self.tail[max(start - d, 0) : start + m - d]
            # floor(x + u), u ~ U[0,1): rounds up with probability frac(x), so E[result] = x. Float64 keeps
            # u to 2^-(52 - log2 L) resolution (2^-21 for b = 32, 2^-10 at the cap), bounding the bias.
            np.add(x, sc.uniform(enc, m), out=x)
            np.floor(x, out=x)
            hi_, lo_ = float(x.max()), float(x.min())
            if not (math.isfinite(hi_) and math.isfinite(lo_)):  # NaN/Inf: the device will be excluded
                with self._lock:
                    self.finite = False
                x[:] = 0.0
            elif hi_ > L or lo_ < -L:
                over = int(np.count_nonzero(x > L)) + int(np.count_nonzero(x < -L))
                np.clip(x, -L, L, out=x)
                with self._lock:
                    self.clamped += over
            np.copyto(out.view(self._signed), x, casting="unsafe")

        return fill

    def finish(self, ints: np.ndarray) -> None:
        """Add the clamp count into the counter slot and reduce to Z_{2^b} (after every chunk was filled)."""
        c = self.codec
        ints[-1] += ints.dtype.type(min(self.clamped, c.level))
        if c.bits not in (32, 64):
            np.bitwise_and(ints, ints.dtype.type((1 << c.bits) - 1), out=ints)


@dataclass
class Encoded:
    ints: np.ndarray  # word dtype, values in Z_{2^b}
    clamped: int  # coordinates that were outside their bound (clamped)
    finite: bool = True  # False when the input held NaN/Inf (the integers are then meaningless)


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
    workers: int = 1  # threads that encode disjoint ranges of the vector
    aux_bounds: tuple[float, ...] = ()  # per-key bounds of the aux scalars (empty: aux_bound for every key)

    def __post_init__(self) -> None:
        if self.aux_bounds and len(self.aux_bounds) != len(self.aux_keys):
            raise ValueError("aux_bounds must give one bound per aux key")
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
    def aux_bound_list(self) -> tuple[float, ...]:
        return tuple(self.aux_bounds) or (self.aux_bound,) * len(self.aux_keys)

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
        s[self.dim + 1 : -1] = [self.level / b for b in self.aux_bound_list]
        s[-1] = 1.0  # clamp counter: plain integers
        return s

    def rounding_slack(self) -> float:
        """Bound on ‖decode(encode(x)) − x‖₂ over the update part, for every rounding outcome: √d steps."""
        return math.sqrt(self.dim) * (1.0 + ROUNDING_MARGIN) / self.value_scale

    def shrink_factor(self, update: np.ndarray, bound: float) -> float:
        """The factor f ≤ 1 to encode `update` with (`encoder(..., scale=f)`) so that ‖f·update‖ ≤ bound −
        rounding_slack(): the decoded contribution then has norm ≤ bound whatever the rounding draws (1.0 when the
        update is already inside; a non-finite update gets 1.0 and `encode` flags it).

        The product f·x·value_scale is taken in float64 inside the encoder (error ≤ 2^-10 of a step at the level
        cap, inside ROUNDING_MARGIN); the float64 norm has relative error < 1e-9, covered by the (1 − 1e-9)."""
        target = float(bound) - self.rounding_slack()
        norm = _norm64(update)
        if not math.isfinite(norm) or norm <= target:
            return 1.0
        if target <= 0.0:
            return 0.0
        return target * (1.0 - 1e-9) / norm

    def check_slack(self, clip_bound: float) -> None:
        """ConfigError when the rounding slack exceeds SLACK_LIMIT of the clip bound (too few bits)."""
        slack = self.rounding_slack()
        if slack > SLACK_LIMIT * clip_bound:
            raise ConfigError(
                f"aggregation.secagg.bits={self.bits} is too coarse for {self.dim:,} values and a cohort of "
                f"{self.cohort_size}: rounding slack {slack / clip_bound:.2%} of the clip bound (> "
                f"{SLACK_LIMIT:.0%}) would shrink every update; raise aggregation.secagg.bits (e.g. 32 or more)"
            )

    def quant_error_bound(self, contributors: int) -> float:
        """Worst-case |decoded − exact| per update coordinate of the sum (each rounding errs by < 1 step)."""
        return contributors / self.value_scale

    def encoder(self, update: np.ndarray, weight: float, aux: dict[str, float], key: bytes,
                scale: float = 1.0) -> ChunkEncoder:
        """A chunk-wise encoder of one device's input × `scale` (used by `encode` and fused into masking)."""
        return ChunkEncoder(self, update, weight, aux, key, scale)

    def encode(self, update: np.ndarray, weight: float, aux: dict[str, float], key: bytes,
               scale: float = 1.0) -> Encoded:
        """Device side: scale, stochastically round (unbiased), clamp to [−L, L], map into Z_{2^b}.

        `key` seeds the rounding stream (see `rounding_key`); equal inputs and keys give equal integers,
        whatever the number of workers or chunking. A non-finite input gives `finite=False` (device excluded).
        """
        enc = self.encoder(update, weight, aux, key, scale)
        ints = np.empty(self.length, dtype=word_dtype(self.bits))

        def work(_w: int, lo: int, hi: int) -> None:
            fill = enc.filler(lo)
            for start in range(lo, hi, CHUNK):
                fill(ints[start : min(start + CHUNK, hi)])

        run_ranges(self.length, self.workers, CHUNK, work)
        enc.finish(ints)
        return Encoded(ints, enc.clamped, enc.finite)

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
