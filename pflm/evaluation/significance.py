"""Is one recognizer's WER really lower than another's? Paired bootstrap CIs and matched-pairs tests over utterances.

Both systems decode the same utterances, so every statistic here is *paired*: utterance i contributes its reference
word count n_i and the word errors a_i (system A) and b_i (system B).

* `paired_bootstrap` — Bisani & Ney, "Bootstrap estimates for confidence intervals in ASR performance evaluation",
  ICASSP 2004: draw utterances with replacement (the same draw for both systems), recompute the corpus-level
  WER difference sum(b - a) / sum(n) on each replicate; the 2.5 / 97.5 percentiles give the 95% interval and the
  share of replicates where B is better gives the "probability of improvement" (POI).
* `cluster_paired_bootstrap` — the same, resampling whole users (all utterances of a user together).
* `bootstrap_wer` — the same resampling for one system's WER (error bars).
* `permutation_test` — the paired (sign-flip) randomization test on the per-utterance error differences d_i = b_i - a_i
  (Fisher/Pitman; "approximate randomization" in Noreen 1989): under H0 the two labels of each utterance are
  exchangeable, so each d_i keeps or flips its sign with probability 1/2. Two-sided p-value of |sum d|; exact by
  enumeration for up to `EXACT_MAX` non-zero differences, otherwise Monte Carlo with the (k + 1) / (R + 1) estimate.
* `sign_test` — the matched-pairs sign test (the sclite "SI" test): among utterances where the systems differ, is
  B better as often as worse? Exact two-sided binomial p (scipy).

Randomness is a seeded NumPy generator: these are public statistics of an evaluation, not secrets.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from pflm.errors import DataError

DEFAULT_RESAMPLES = 10_000
EXACT_MAX = 16  # 2**16 sign patterns: exact enumeration is cheaper than Monte Carlo below this


def _paired(a_errors, b_errors, ref_words) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    a = np.asarray(a_errors, dtype=np.float64)
    b = np.asarray(b_errors, dtype=np.float64)
    n = np.asarray(ref_words, dtype=np.float64)
    if not (a.shape == b.shape == n.shape) or a.ndim != 1:
        raise DataError(f"paired statistics need equal 1-D arrays, got shapes {a.shape}, {b.shape}, {n.shape}")
    if a.size == 0:
        raise DataError("paired statistics need at least one utterance")
    if n.sum() <= 0:
        raise DataError("the references contain no words; WER is undefined")
    return a, b, n


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap of the corpus WER difference B - A (negative = B has fewer errors)."""

    delta: float  # observed WER(B) - WER(A)
    low: float  # 2.5th percentile (for level 0.95)
    high: float  # 97.5th percentile
    prob_improvement: float  # share of replicates with WER(B) < WER(A)
    resamples: int
    level: float

    @property
    def excludes_zero(self) -> bool:
        return self.high < 0 or self.low > 0


def _replicate_indices(rng: np.random.Generator, size: int, resamples: int, chunk: int) -> Iterator[np.ndarray]:
    for start in range(0, resamples, chunk):
        yield rng.integers(0, size, size=(min(chunk, resamples - start), size))


def paired_bootstrap(
    a_errors, b_errors, ref_words, resamples: int = DEFAULT_RESAMPLES, level: float = 0.95, seed: int = 0
) -> BootstrapResult:
    """Bisani & Ney (2004) paired bootstrap over utterances of WER(B) - WER(A); percentile interval at `level`."""
    a, b, n = _paired(a_errors, b_errors, ref_words)
    if resamples < 1 or not 0 < level < 1:
        raise DataError(f"need resamples >= 1 and 0 < level < 1, got {resamples}, {level}")
    rng = np.random.default_rng(seed)
    d = b - a
    deltas = []
    for idx in _replicate_indices(rng, d.size, resamples, max(1, 4_000_000 // d.size)):
        deltas.append(d[idx].sum(axis=1) / n[idx].sum(axis=1))
    reps = np.concatenate(deltas)
    tail = (1 - level) / 2
    low, high = np.quantile(reps, [tail, 1 - tail])
    return BootstrapResult(
        delta=float(d.sum() / n.sum()),
        low=float(low),
        high=float(high),
        prob_improvement=float(np.mean(reps < 0)),
        resamples=resamples,
        level=level,
    )


def cluster_paired_bootstrap(
    a_errors, b_errors, ref_words, groups, resamples: int = DEFAULT_RESAMPLES, level: float = 0.95, seed: int = 0
) -> BootstrapResult:
    """`paired_bootstrap` resampling whole groups (users) instead of utterances: the cluster bootstrap (Davison &
    Hinkley 1997, section 3.8; Bisani & Ney 2004 resample "speakers" when utterances share one). Utterances of
    one user are not independent; with few users the utterance bootstrap's interval is too narrow."""
    a, b, n = _paired(a_errors, b_errors, ref_words)
    g = np.asarray(groups)
    if g.shape != a.shape:
        raise DataError(f"groups must label every utterance: {g.shape} labels for {a.shape[0]} utterances")
    _, first, inv = np.unique(g, return_index=True, return_inverse=True)
    rank = np.empty_like(first)
    rank[np.argsort(first)] = np.arange(first.size)
    inv = rank[inv.reshape(-1)]  # groups numbered in order of first appearance (singletons: the utterance order)
    k = int(first.size)
    return paired_bootstrap(np.bincount(inv, a, k), np.bincount(inv, b, k), np.bincount(inv, n, k),
                            resamples=resamples, level=level, seed=seed)


def bootstrap_wer(
    errors, ref_words, resamples: int = DEFAULT_RESAMPLES, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """(WER, low, high): percentile bootstrap interval of one system's corpus WER, resampling utterances."""
    e = np.asarray(errors, dtype=np.float64)
    zero = np.zeros_like(e)
    r = paired_bootstrap(zero, e, ref_words, resamples=resamples, level=level, seed=seed)
    return r.delta, r.low, r.high


@dataclass(frozen=True)
class TestResult:
    """A matched-pairs test of H0 'A and B are equally accurate'."""

    name: str
    statistic: float
    p_value: float
    exact: bool
    better: int  # utterances where B has fewer errors than A
    worse: int  # utterances where B has more errors


def permutation_test(a_errors, b_errors, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> TestResult:
    """Two-sided paired sign-flip randomization test of sum(b_i - a_i) over utterances."""
    a = np.asarray(a_errors, dtype=np.float64)
    b = np.asarray(b_errors, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise DataError(f"permutation test needs two equal non-empty 1-D arrays, got {a.shape} and {b.shape}")
    d = b - a
    nz = d[d != 0]
    observed = abs(float(d.sum()))
    better, worse = int((d < 0).sum()), int((d > 0).sum())
    if nz.size == 0:
        return TestResult("paired permutation (sign-flip)", 0.0, 1.0, True, better, worse)
    eps = 1e-9 * max(1.0, observed)
    if nz.size <= EXACT_MAX:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=nz.size)))
        stats = np.abs(signs @ nz)
        return TestResult("paired permutation (sign-flip)", float(d.sum()), float(np.mean(stats >= observed - eps)), True, better, worse)
    rng = np.random.default_rng(seed)
    hits = 0
    chunk = max(1, 4_000_000 // nz.size)
    for start in range(0, resamples, chunk):
        signs = rng.integers(0, 2, size=(min(chunk, resamples - start), nz.size)) * 2.0 - 1.0
        hits += int(np.sum(np.abs(signs @ nz) >= observed - eps))
    return TestResult("paired permutation (sign-flip)", float(d.sum()), (hits + 1) / (resamples + 1), False, better, worse)


def sign_test(a_errors, b_errors) -> TestResult:
    """Exact two-sided matched-pairs sign test over utterances whose error counts differ (ties dropped)."""
    from scipy.stats import binomtest

    a = np.asarray(a_errors, dtype=np.float64)
    b = np.asarray(b_errors, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise DataError(f"sign test needs two equal non-empty 1-D arrays, got {a.shape} and {b.shape}")
    better, worse = int((b < a).sum()), int((b > a).sum())
    if better + worse == 0:
        return TestResult("sign test", 0.0, 1.0, True, 0, 0)
    p = binomtest(better, better + worse, 0.5, alternative="two-sided").pvalue
    return TestResult("sign test", float(better - worse), float(p), True, better, worse)
