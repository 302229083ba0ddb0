"""Cohort sampling from the run's secret key: Poisson (each user independently with rate q) or fixed-size.

The cohort must be secret: amplification by subsampling, which the ε relies on, assumes nobody outside the
server learns who took part. So it is drawn from the run's CSPRNG (`pflm.secure_random`), never from the
recipe's public seed; a resumed run redraws exactly the same cohort from the same key.
"""

from __future__ import annotations

from pflm.errors import ConfigError
from pflm.secure_random import SecureRandom

PURPOSE = "cohort"


def sample_cohort(population: int, cohort_size: int, mode: str, rng: SecureRandom, round_idx: int) -> list[int]:
    """User indices of round `round_idx`'s cohort, a pure function of (run key, round)."""
    if mode == "fixed":
        return rng.choice(round_idx, population, min(cohort_size, population), PURPOSE).tolist()
    if mode == "poisson":
        return rng.bernoulli(round_idx, population, min(1.0, cohort_size / population), PURPOSE).tolist()
    if mode == "available":  # stateful (participation limits): the server keeps a ParticipationScheduler
        raise ConfigError("sampling 'available' needs pflm.server.participation.ParticipationScheduler")
    raise ConfigError(f"unknown sampling mode {mode!r}: use poisson, fixed or available")
