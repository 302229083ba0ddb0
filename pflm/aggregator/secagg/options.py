"""Validated options of the secure aggregator (built from the recipe's `aggregation.secagg` mapping)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from pflm.aggregator.secagg.graph import effective_degree
from pflm.aggregator.secagg.params import SecAggParameters, minimum_threshold, parameters_for, secagg_parameters
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
    # t = ceil(threshold · degree) shares reconstruct a device's secrets; must be > 1/2 (> 2/3 with malicious).
    # None = 0.6 (0.7 with malicious). Ignored with neighbours="log", whose t comes from `secagg_parameters`.
    threshold: float | None = None
    # "full" (Bonawitz), "log" (SecAgg+: k and t from Bell et al.'s conditions, `params.secagg_parameters`) or int k
    neighbours: int | str = "full"
    # assumptions of neighbours="log" (and of the printed parameters): colluding and dropping fractions, and the
    # target failure probability 2^-failure_log2 for privacy and for correctness
    corrupt_fraction: float = 0.05
    dropout_fraction: float = 0.05
    failure_log2: float = 20.0
    # log2 of the graphs an active adversary may try by choosing colluders' keys (the seed hashes all keys):
    # the privacy target becomes 2^-(failure_log2 + grinding_log2). None = 0 (semi-honest) / 64 (malicious).
    grinding_log2: float | None = None
    # Malicious-server variant (Bonawitz et al. 2017 §4): Ed25519-signed key advertisements under the device key
    # registry and a consistency-check round before unmasking; thresholds must exceed 2/3 of the degree.
    malicious: bool = False
    # Device-side floor on the graph degree a device accepts (its trusted parameter); None = the degree its own
    # config gives for the announced cohort size.
    min_neighbours: int | None = None
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
        _check(isinstance(self.malicious, bool), f"{pre}malicious={self.malicious!r} must be true or false")
        if self.threshold is None:
            self.threshold = 0.7 if self.malicious else 0.6
        floor, why = (2 / 3, "> 2/3 with malicious=true") if self.malicious else (0.5, "> 1/2")
        _check(
            floor < self.threshold <= 1,
            f"{pre}threshold={self.threshold} must be a fraction in ({floor:.3g}, 1] ({why}: below it a server "
            "that lies about dropouts can collect both share kinds of a device), e.g. 0.6 (0.7 with malicious)",
        )
        for name in ("corrupt_fraction", "dropout_fraction"):
            v = getattr(self, name)
            _check(0 <= v < 0.5, f"{pre}{name}={v} must be a fraction in [0, 0.5)")
        if self.grinding_log2 is None:
            self.grinding_log2 = 64.0 if self.malicious else 0.0
        _check(self.grinding_log2 >= 0, f"{pre}grinding_log2={self.grinding_log2} must be >= 0")
        _check(self.failure_log2 > 0, f"{pre}failure_log2={self.failure_log2} must be > 0 (e.g. 20 for 2^-20)")
        _check(
            self.min_neighbours is None or (isinstance(self.min_neighbours, int) and self.min_neighbours >= 2),
            f"{pre}min_neighbours={self.min_neighbours!r} must be an integer >= 2 (or unset)",
        )
        if isinstance(self.neighbours, str) and self.neighbours.strip().isdigit():
            self.neighbours = int(self.neighbours)
        if isinstance(self.neighbours, int) and not isinstance(self.neighbours, bool):
            _check(self.neighbours >= 2, f"{pre}neighbours={self.neighbours} must be >= 2 (or 'full' / 'log')")
        else:
            _check(
                self.neighbours in ("full", "log"),
                f"{pre}neighbours={self.neighbours!r} must be 'full', 'log' or an integer degree >= 2",
            )
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

    def bell_parameters(self, n: int) -> SecAggParameters:
        """Bell et al.-style (k, t) for cohort n under this config's γ, δ, failure target and server model."""
        return secagg_parameters(n, self.corrupt_fraction, self.dropout_fraction, self.failure_log2, self.malicious,
                                 float(self.grinding_log2 or 0.0))

    def degree(self, n: int) -> int:
        """Requested neighbour count for a cohort of n devices (before the graph rounds it; ≤ n − 1)."""
        if self.neighbours == "full":
            return n - 1
        if self.neighbours == "log":
            return self.bell_parameters(n).k
        return min(n - 1, int(self.neighbours))

    def threshold_for(self, degree: int, n: int | None = None) -> int:
        """Shares needed to reconstruct a secret held by `degree` neighbours (≥ 2, > degree/2 (> 2/3 malicious),
        ≤ degree); with neighbours="log" and the cohort size n, Bell et al.'s t."""
        assert self.threshold is not None
        t = max(2, math.ceil(self.threshold * degree), minimum_threshold(degree, self.malicious))
        if self.neighbours == "log" and n is not None and degree == self.bell_parameters(n).k:
            t = max(self.bell_parameters(n).t, minimum_threshold(degree, self.malicious), 2)
        return min(degree, t)

    def round_parameters(self, n: int) -> tuple[int, int]:
        """(degree every device gets, threshold) for a cohort of n devices; what devices check the server against."""
        k = effective_degree(n, self.degree(n))
        return k, self.threshold_for(k, n)

    def parameters(self, n: int) -> SecAggParameters:
        """(k, t) of a cohort of n with the assumptions (γ, δ, server model) and failure bounds behind them —
        what a run prints (for its expected cohort: the realised size is private under Poisson sampling)."""
        k, t = self.round_parameters(n)
        return parameters_for(n, k, t, self.corrupt_fraction, self.dropout_fraction, self.malicious,
                              float(self.grinding_log2 or 0.0))

    def device_floor(self, n: int) -> tuple[int, int]:
        """The smallest (degree, threshold) an honest device of this config accepts for an announced cohort n."""
        k, t = self.round_parameters(n)
        if self.min_neighbours is not None:
            k = min(n - 1, self.min_neighbours)
            t = self.threshold_for(k, n)
        return k, t

    @property
    def value_factor(self) -> float:
        """Coordinate bound in units of the clip bound (updates may arrive multiplied by their weight)."""
        return self.max_weight if self.value_bound_factor is None else self.value_bound_factor
