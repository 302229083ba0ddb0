"""Cohort sampling: fixed-size (uniform without replacement) or Poisson (each user independently with rate q)."""

from __future__ import annotations

import numpy as np


def sample_cohort(population: int, cohort_size: int, mode: str, seed: int, round_idx: int) -> list[int]:
    """User indices of the round's cohort; depends only on (seed, round) so resumed runs resample identically."""
    rng = np.random.default_rng([seed, round_idx, 0xC0])
    if mode == "fixed":
        return sorted(rng.choice(population, size=min(cohort_size, population), replace=False).tolist())
    if mode == "poisson":
        q = min(1.0, cohort_size / population)
        return np.flatnonzero(rng.random(population) < q).tolist()
    raise ValueError(f"unknown sampling mode {mode!r}")
