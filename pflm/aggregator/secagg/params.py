"""SecAgg+ degree k and threshold t from Bell et al. (CCS 2020)'s conditions, with exact tail bounds for our graph.

Bell et al. (Secure Single-Server Aggregation with (Poly)Logarithmic Overhead, §3–4) show that a sparse graph
keeps Bonawitz et al.'s guarantees when, except with a small failure probability over the random graph,
for a cohort of n devices of which at most γ·n are corrupted (colluding with the server) and at most δ·n drop:

  (privacy 1)   every honest device has fewer corrupted neighbours than the number the attack needs: t in the
                semi-honest setting (the server must collect t shares from colluders), 2t − k with an actively
                malicious server (the dropout lie splits the honest neighbours into two camps that each give one
                kind of share, so the colluders must fill t − c + t − c + c ≤ k, i.e. c ≥ 2t − k);
  (privacy 2)   the honest, surviving devices stay connected (otherwise the server learns the sums of the
                connected pieces, not only of the whole cohort);
  (correctness) every device keeps ≥ t neighbours that answer the unmasking request.

Their theorem states these with Chernoff bounds for an Erdős–Rényi graph. pflm's graph is a Harary ring in a
uniformly random order (`graph.harary_graph`), so this module bounds the same three events directly for that
graph, exactly (hypergeometric tails: a device's k neighbours are a uniform k-subset of the other n − 1; the
ring disconnects only if two disjoint runs of ⌊k/2⌋ consecutive ring positions are all corrupted-or-dropped),
and union-bounds over devices. `secagg_parameters` returns the smallest k (and, for it, the smallest t) that
meets both targets, 2^-failure_log2 for privacy and for correctness.

Grinding: the graph seed hashes every advertised key, and a colluding device chooses its key after seeing the
honest ones, so an active adversary can try ~2^grinding_log2 graphs (each try is one hash) and keep a bad one.
The privacy target is therefore 2^-(failure_log2 + grinding_log2); the malicious variant assumes 2^64 tries.
When even all γ·n colluders are fewer than the attack needs (2t − k > γ·n), no graph is bad and grinding is moot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class SecAggParameters:
    """A cohort's graph degree and Shamir threshold with the assumptions and failure bounds that justify them."""

    n: int
    k: int  # neighbours per device (n − 1: complete graph)
    t: int  # shares needed to reconstruct one device's secret
    corrupt_fraction: float  # γ: devices that may collude with the server
    dropout_fraction: float  # δ: devices that may drop out (including those that stop answering)
    malicious: bool  # the server may deviate (dropout lie): corrupted neighbours must stay below 2t − k, not t
    privacy_failure: float  # upper bound on P[one random graph breaks privacy] (before grinding)
    correctness_failure: float  # upper bound on P[some survivor cannot be unmasked]
    grinding_log2: float = 0.0  # log2 of the graphs an adversary may try (privacy target tightened by it)

    def describe(self) -> str:
        return (
            f"SecAgg+ parameters (Bell et al. 2020 conditions): n={self.n} k={self.k} t={self.t} "
            f"γ={self.corrupt_fraction:g} δ={self.dropout_fraction:g} "
            f"{'malicious' if self.malicious else 'semi-honest'} server; "
            f"P[privacy fails] ≤ 2^{_log2(self.privacy_failure)} per graph"
            + (f" (≤ 2^{_log2(self.privacy_failure * 2.0**self.grinding_log2)} after 2^{self.grinding_log2:g} tries)"
               if self.grinding_log2 else "")
            + f", P[correctness fails] ≤ 2^{_log2(self.correctness_failure)}"
        )


def _log2(p: float) -> str:
    return "-inf" if p <= 0 else f"{math.log2(p):.1f}"


@lru_cache(maxsize=65536)
def hypergeom_sf(population: int, marked: int, draws: int, at_least: int) -> float:
    """P[X ≥ at_least] for X = marked items among `draws` drawn without replacement from `population` (exact)."""
    if at_least <= 0:
        return 1.0
    hi = min(marked, draws)
    if at_least > hi:
        return 0.0
    total = math.comb(population, draws)
    num = sum(math.comb(marked, i) * math.comb(population - marked, draws - i) for i in range(at_least, hi + 1))
    return num / total


def _all_removed(n: int, removed: int, m: int) -> float:
    """P[m given devices are all among `removed` uniformly chosen of n] (≤ (removed/n)^m)."""
    if m > removed:
        return 0.0
    return math.comb(n - m, removed - m) / math.comb(n, removed)


def failure_bounds(n: int, k: int, t: int, corrupt: float, dropout: float, malicious: bool) -> tuple[float, float]:
    """(privacy, correctness) failure bounds for the random Harary ring of degree k and threshold t."""
    c = math.ceil(corrupt * n)
    d = math.ceil(dropout * n)
    need = 2 * t - k if malicious else t  # corrupted neighbours that break one honest device
    p_nbr = n * hypergeom_sf(n - 1, min(c, n - 1), k, need) if c else 0.0
    if k >= n - 1:
        p_conn = 0.0  # the complete graph stays connected whatever is removed
    else:
        h = k // 2
        removed = min(n, c + d)
        p_conn = math.comb(n, 2) * _all_removed(n, removed, 2 * h) if h else 1.0
    p_corr = n * hypergeom_sf(n - 1, min(d + (c if malicious else 0), n - 1), k, k - t + 1)
    return min(1.0, p_nbr + p_conn), min(1.0, p_corr)


@lru_cache(maxsize=1024)
def secagg_parameters(
    n: int,
    corrupt_fraction: float = 0.05,
    dropout_fraction: float = 0.05,
    failure_log2: float = 20.0,
    malicious: bool = False,
    grinding_log2: float = 0.0,
) -> SecAggParameters:
    """The smallest degree k (and smallest threshold t for it) meeting both failure targets for cohort n.

    Falls back to the complete graph (k = n − 1) when no sparser graph qualifies; the threshold then is the
    smallest t meeting the privacy bound (correctness is then reported, not guaranteed, if dropouts are high).
    The threshold is always > k/2 (> 2k/3 with `malicious`), the floor honest devices enforce.
    """
    if n < 3:
        raise ValueError(f"secure aggregation needs a cohort of at least 3 devices, got {n}")
    if not (0 <= corrupt_fraction < 1 and 0 <= dropout_fraction < 1):
        raise ValueError("corrupt and dropout fractions must be in [0, 1)")
    target = 2.0 ** (-failure_log2)
    priv_target = 2.0 ** (-(failure_log2 + grinding_log2))
    from pflm.aggregator.secagg.graph import effective_degree

    best: SecAggParameters | None = None
    for k in range(2, n):
        if effective_degree(n, k) != k and k != n - 1:
            continue  # the Harary construction would round this degree up
        lo = max(2, minimum_threshold(k, malicious))
        for t in range(lo, k + 1):
            priv, corr = failure_bounds(n, k, t, corrupt_fraction, dropout_fraction, malicious)
            if priv <= priv_target:
                cand = SecAggParameters(n, k, t, corrupt_fraction, dropout_fraction, malicious, priv, corr, grinding_log2)
                if corr <= target:
                    return cand
                if k == n - 1 and best is None:
                    best = cand
                break  # a larger t only hurts correctness
    if best is None:  # not even the complete graph meets the privacy target: the strongest threshold
        k = n - 1
        priv, corr = failure_bounds(n, k, k, corrupt_fraction, dropout_fraction, malicious)
        best = SecAggParameters(n, k, k, corrupt_fraction, dropout_fraction, malicious, priv, corr, grinding_log2)
    return best


def parameters_for(
    n: int, k: int, t: int, corrupt_fraction: float, dropout_fraction: float, malicious: bool, grinding_log2: float = 0.0
) -> SecAggParameters:
    """The failure bounds of a given (k, t) (e.g. the complete graph or a fixed degree) under the same model."""
    priv, corr = failure_bounds(n, k, t, corrupt_fraction, dropout_fraction, malicious)
    return SecAggParameters(n, k, t, corrupt_fraction, dropout_fraction, malicious, priv, corr, grinding_log2)


def minimum_threshold(k: int, malicious: bool) -> int:
    """The smallest threshold an honest device accepts for degree k: > k/2, or > 2k/3 against a malicious server."""
    return (2 * k) // 3 + 1 if malicious else k // 2 + 1
