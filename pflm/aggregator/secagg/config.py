"""Validated options of the secure aggregator (built from the recipe's `aggregation.secagg` mapping)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pflm.errors import ConfigError

_DROPOUT_FIELDS = ("dropout_advertise", "dropout_share", "dropout_masked_input", "dropout_unmask")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


@dataclass
class SecAggConfig:
    """Options of `SecureAggregator`; every field has a safe default."""

    # "full": the real protocol (X25519, Shamir, AES-CTR masks); "simulate": the same integers without cryptography
    mode: Literal["full", "simulate"] = "full"
    bits: int = 32  # arithmetic is modulo 2^bits
    threshold: float = 0.6  # t = ceil(threshold · degree) shares reconstruct a device's secrets
    neighbours: int | str = "full"  # "full" (Bonawitz), "log" (SecAgg+, k ≈ log_factor·log2 n) or an int k
    log_factor: float = 2.0
    max_weight: float = 1.0  # bound on a device's weight (the largest token count with server.weighting=tokens)
    # |update coordinate| ≤ clip_bound · factor; None = max_weight (updates arrive multiplied by their weight)
    value_bound_factor: float | None = None
    aux_bound: float = 1.0  # bound on each aux scalar (e.g. the 0/1 "clipped" indicator)
    aux_keys: list[str] = field(default_factory=list)  # aux layout; [] = the keys of the round's first update
    # "urandom" (default): each device upload draws a fresh secret stochastic-rounding key from the OS CSPRNG
    # (in a simulation given the secret run key: subkey(run_key, ...) per round and device, secret and resumable).
    # "seeded": the stream is SHA-256(run seed, round, device), i.e. reproducible but NOT secret (the recipe seed
    # is public: anyone can recompute every device's rounding draws); for tests and bit-exact replays only.
    rounding: Literal["seeded", "urandom"] = "urandom"
    dropout_advertise: float = 0.0  # simulated probability a device drops before advertising keys
    dropout_share: float = 0.0  # ... after advertising, before sending its encrypted shares
    dropout_masked_input: float = 0.0  # ... after key sharing, before sending its masked input
    dropout_unmask: float = 0.0  # ... after sending its masked input, before answering the unmasking request
    # Simulation-only diagnostic: each upload also carries a PLAINTEXT sample of its update (≤ 65,536 coordinates)
    # so finalize can report secagg_quant_error_max. That sample bypasses secure aggregation: keep False for
    # anything but codec debugging.
    measure_quant_error: bool = False
    threads: int = 0  # threads for encoding, mask expansion and unmasking (0 = every CPU this process may use)
    keep_transcript: bool = False  # keep the server's full view (tests / audits; memory ∝ cohort · dim)

    def __post_init__(self) -> None:
        pre = "aggregation.secagg."
        _check(self.mode in ("full", "simulate"), f"{pre}mode {self.mode!r} is not 'full' or 'simulate'")
        _check(
            isinstance(self.bits, int) and 16 <= self.bits <= 62,
            f"{pre}bits={self.bits!r} must be an integer in [16, 62] (32 is the usual choice)",
        )
        _check(0 < self.threshold <= 1, f"{pre}threshold={self.threshold} must be a fraction in (0, 1], e.g. 0.6")
        if isinstance(self.neighbours, str) and self.neighbours.strip().isdigit():
            self.neighbours = int(self.neighbours)
        if isinstance(self.neighbours, int) and not isinstance(self.neighbours, bool):
            _check(self.neighbours >= 2, f"{pre}neighbours={self.neighbours} must be >= 2 (or 'full' / 'log')")
        else:
            _check(
                self.neighbours in ("full", "log"),
                f"{pre}neighbours={self.neighbours!r} must be 'full', 'log' or an integer degree >= 2",
            )
        _check(self.log_factor > 0, f"{pre}log_factor={self.log_factor} must be > 0 (degree = factor · log2 n)")
        for name in ("value_bound_factor", "max_weight", "aux_bound"):
            v = getattr(self, name)
            if v is None and name == "value_bound_factor":
                continue
            _check(math.isfinite(v) and v > 0, f"{pre}{name}={v} must be a finite number > 0")
        _check(
            all(isinstance(k, str) and k for k in self.aux_keys),
            f"{pre}aux_keys must be a list of non-empty names, e.g. [clipped]",
        )
        _check(len(set(self.aux_keys)) == len(self.aux_keys), f"{pre}aux_keys has duplicate names")
        _check(self.rounding in ("seeded", "urandom"), f"{pre}rounding {self.rounding!r} is not 'seeded' or 'urandom'")
        _check(
            isinstance(self.threads, int) and self.threads >= 0,
            f"{pre}threads={self.threads!r} must be an integer >= 0 (0 = all CPUs)",
        )
        for name in _DROPOUT_FIELDS:
            p = getattr(self, name)
            _check(0 <= p < 1, f"{pre}{name}={p} must be a probability in [0, 1)")

    def degree(self, n: int) -> int:
        """Requested neighbour count for a cohort of n devices (before the graph rounds it; ≤ n − 1)."""
        if self.neighbours == "full":
            return n - 1
        if self.neighbours == "log":
            return min(n - 1, max(2, math.ceil(self.log_factor * math.log2(max(n, 2)))))
        return min(n - 1, int(self.neighbours))

    def threshold_for(self, degree: int) -> int:
        """Shares needed to reconstruct a secret held by `degree` neighbours (at least 2, at most degree)."""
        return min(degree, max(2, math.ceil(self.threshold * degree)))

    @property
    def value_factor(self) -> float:
        """Coordinate bound in units of the clip bound (updates may arrive multiplied by their weight)."""
        return self.max_weight if self.value_bound_factor is None else self.value_bound_factor
