"""The statistics of a memorisation audit: Secret Sharer exposure, the one-run ε estimate, Clopper–Pearson ε bounds.

Pure functions of canary scores (no model, no training), so each is tested against the papers' closed forms:

* **exposure** (Carlini et al. 2019, "The Secret Sharer", §4): log2 |space| − log2 rank of the canary among every
  phrase of its space, ranked by the trained model's log-likelihood; for spaces too large to enumerate, the
  paper's extrapolation (§4.3): fit a (skew-)normal to the log-likelihoods of sampled members and read the
  exposure as −log2 of the fitted probability that a random member scores at least as high as the canary.
* **one-run ε estimate** (Andrew et al., ICLR 2024, "One-shot Empirical Privacy Estimation for Federated
  Learning", Alg. 1/2): canary clients submit random unit directions; the cosines between each direction and
  the final model delta (or the max over the per-round deltas when every iterate is released) are modelled as
  N(μ, σ²) against the null N(0, 1/d) (final model) or the Gaussian fitted to never-inserted canaries (all
  iterates), and ε is the ε of that pair of Gaussians at δ (hockey-stick divergence, both directions).
  An *estimate*, not a bound: its bootstrap interval says how well k canaries pin it down.
* **Clopper–Pearson lower bound** (Jagielski et al. 2020; Nasr et al. 2021): for a membership test "score ≥ t",
  an (ε, δ)-DP mechanism has TPR ≤ e^ε·FPR + δ, so ε ≥ ln((TPR_lo − δ) / FPR_hi) with one-sided Clopper–Pearson
  bounds; a Bonferroni correction over every threshold the test may pick keeps the bound valid at the stated
  confidence however the threshold is chosen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.stats as st

EPS_MAX = 100.0  # ε search ceiling: "at least this much" (a separation this large is no privacy at all)


# ---- exposure ---------------------------------------------------------------------------------------------
def exact_exposure(canary_score: float, space_scores: np.ndarray) -> float:
    """Exposure from the exact rank: log2 |S| − log2 rank, rank = 1 + #members scoring strictly higher (a tie
    gives the canary the best rank among equals, the attacker's view; the space includes the canary itself). Scores are log-likelihoods (higher = more likely)."""
    s = np.asarray(space_scores, dtype=np.float64)
    rank = 1 + int(np.sum(s > canary_score))
    return math.log2(s.size) - math.log2(rank)


def extrapolated_exposure(canary_score: float, sample_scores: np.ndarray, family: str = "skewnorm") -> float:
    """Exposure by the Secret Sharer's extrapolation: −log2 P(X ≥ canary score) with X fitted to the scores of
    members sampled uniformly from the space ("skewnorm" as in the paper, or "normal"). Not capped at log2 |S|:
    the caller caps it (a rank below 1 is impossible)."""
    x = np.asarray(sample_scores, dtype=np.float64)
    if family == "normal":
        logsf = st.norm.logsf(canary_score, loc=x.mean(), scale=x.std(ddof=1))
    elif family == "skewnorm":
        a, loc, scale = st.skewnorm.fit(x)
        logsf = st.skewnorm.logsf(canary_score, a, loc=loc, scale=scale)
    else:
        raise ValueError(f"unknown family {family!r}")
    return float(-logsf / math.log(2))


# ---- ε of a pair of Gaussians (the one-run estimator's last step) -------------------------------------------
def _hockey_stick(mu_p: float, s_p: float, mu_q: float, s_q: float, eps: float) -> float:
    """H_{e^ε}(P ‖ Q) = sup_S P(S) − e^ε Q(S) for P = N(mu_p, s_p²), Q = N(mu_q, s_q²), in closed form: S is where
    the (quadratic) log-likelihood ratio exceeds ε — an interval, its complement, or a half line."""
    a = 1 / (2 * s_q**2) - 1 / (2 * s_p**2)
    b = mu_p / s_p**2 - mu_q / s_q**2
    c = mu_q**2 / (2 * s_q**2) - mu_p**2 / (2 * s_p**2) + math.log(s_q / s_p) - eps

    def sf(x: float, m: float, sd: float) -> float:  # erfc keeps the far tail accurate (no 1 − cdf cancellation)
        return 0.5 * math.erfc((x - m) / (sd * math.sqrt(2))) if x != math.inf else 0.0

    def prob(lo: float, hi: float, m: float, sd: float) -> float:  # P(lo < N(m, sd²) < hi)
        if lo >= m:
            return sf(lo, m, sd) - sf(hi, m, sd)
        return sf(-hi, -m, sd) - sf(-lo, -m, sd)  # the mirrored upper tail: P(−hi < −X < −lo)

    def mass(lo: float, hi: float) -> float:  # P(lo < X < hi) − e^ε Q(lo < X < hi)
        p, q = prob(lo, hi, mu_p, s_p), prob(lo, hi, mu_q, s_q)
        return p - math.exp(eps) * q if eps < 700 else (p if q == 0 else -math.inf)

    if abs(a) < 1e-12 * max(abs(b), 1e-300):  # (numerically) equal variances: a half line
        if b == 0:
            return 0.0
        x0 = -c / b
        return max(0.0, mass(x0, math.inf) if b > 0 else mass(-math.inf, x0))
    disc = b * b - 4 * a * c
    if disc <= 0:  # f(x) = a x² + b x + c has one sign everywhere
        return max(0.0, mass(-math.inf, math.inf)) if a > 0 else 0.0
    r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
    if a > 0:  # f > 0 outside the roots
        return max(0.0, mass(-math.inf, r1) + mass(r2, math.inf))
    return max(0.0, mass(r1, r2))


def gaussian_pair_epsilon(mu0: float, s0: float, mu1: float, s1: float, delta: float) -> float:
    """The smallest ε ≥ 0 with H_{e^ε}(P0‖P1) ≤ δ and H_{e^ε}(P1‖P0) ≤ δ for P_i = N(mu_i, s_i²): the (ε, δ) at
    which the two output distributions are indistinguishable (Andrew et al. 2024, §3). EPS_MAX if none below."""
    if not (s0 > 0 and s1 > 0) or not 0 < delta < 1:
        raise ValueError("need positive standard deviations and δ in (0, 1)")

    def worst(eps: float) -> float:
        return max(_hockey_stick(mu0, s0, mu1, s1, eps), _hockey_stick(mu1, s1, mu0, s0, eps))

    if worst(0.0) <= delta:
        return 0.0
    if worst(EPS_MAX) > delta:
        return EPS_MAX
    lo, hi = 0.0, EPS_MAX
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if worst(mid) > delta else (lo, mid)
    return hi


def gaussian_mechanism_delta(eps: float, mu: float) -> float:
    """δ(ε) of the Gaussian mechanism with sensitivity/σ = mu (Balle & Wang 2018, Thm 8): the closed form the
    pair-of-Gaussians ε must reproduce when both variances are equal."""
    return float(st.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * st.norm.cdf(-eps / mu - mu / 2))


@dataclass
class OneRunEstimate:
    """Andrew et al.'s ε estimate from canary cosines, with a bootstrap interval over the canaries."""

    epsilon: float
    epsilon_low: float  # bootstrap (1 − confidence)/2 quantile
    epsilon_high: float
    mean: float  # of the observed (inserted) canaries' statistic
    std: float
    null_mean: float
    null_std: float
    null: str  # "analytic N(0, 1/d)" or "fitted to held-out canaries"


def one_run_epsilon(
    observed: np.ndarray, delta: float, dim: int | None = None, null_scores: np.ndarray | None = None,
    confidence: float = 0.95, resamples: int = 400, seed: int = 0,
) -> OneRunEstimate:
    """ε estimate from the observed canaries' statistics. Null: N(0, 1/dim) when `dim` is given (cosine of a
    random direction with any fixed vector, Andrew et al. Alg. 1), else a Gaussian fitted to `null_scores`
    (statistics of never-inserted canaries, e.g. the max cosine over all released iterates). The bootstrap
    resamples canaries with a public seed (the interval is a property of the statistic, not a secret)."""
    obs = np.asarray(observed, dtype=np.float64)
    if obs.size < 2:
        raise ValueError("the one-run estimate needs at least 2 observed canaries")
    if dim is not None:
        null_mu, null_sd, label = 0.0, 1 / math.sqrt(dim), "analytic N(0, 1/d)"
        nulls = None
    else:
        nulls = np.asarray(null_scores, dtype=np.float64)
        if nulls.size < 2:
            raise ValueError("the one-run estimate needs at least 2 held-out canaries for a fitted null")
        null_mu, null_sd, label = float(nulls.mean()), float(nulls.std(ddof=1)), "fitted to held-out canaries"

    # A resample of a few canaries can repeat one value (std 0): floor every std at 1e-6 of the pooled scale.
    floor = 1e-6 * max(float(np.std(np.concatenate([obs, nulls]) if nulls is not None else obs)), null_sd, 1e-150)

    def estimate(o: np.ndarray, n: np.ndarray | None) -> float:
        m0, s0 = (null_mu, null_sd) if n is None else (float(n.mean()), float(n.std(ddof=1)))
        return gaussian_pair_epsilon(m0, max(s0, floor), float(o.mean()), max(float(o.std(ddof=1)), floor), delta)

    eps = estimate(obs, nulls)
    rng = np.random.default_rng(seed)
    boots = [estimate(rng.choice(obs, obs.size), None if nulls is None else rng.choice(nulls, nulls.size))
             for _ in range(resamples)]
    lo, hi = np.quantile(boots, [(1 - confidence) / 2, (1 + confidence) / 2])
    return OneRunEstimate(eps, float(lo), float(hi), float(obs.mean()), float(obs.std(ddof=1)), null_mu, null_sd, label)


# ---- Clopper–Pearson lower bound from a membership test -------------------------------------------------------
def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided (lower, upper) Clopper–Pearson bounds on a binomial rate, each holding with probability 1 − α."""
    lo = 0.0 if k == 0 else float(st.beta.ppf(alpha, k, n - k + 1))
    hi = 1.0 if k == n else float(st.beta.ppf(1 - alpha, k + 1, n - k))
    return lo, hi


@dataclass
class MembershipBound:
    epsilon_lower: float  # ≥ 0; with probability ≥ confidence the mechanism's ε is at least this (at δ)
    threshold: float | None  # the score threshold that achieved it (None when no threshold gives ε > 0)
    tpr: float  # raw rates at that threshold
    fpr: float
    tests: int  # thresholds the Bonferroni correction covers


def epsilon_lower_bound(inserted: np.ndarray, held_out: np.ndarray, delta: float, confidence: float = 0.95) -> MembershipBound:
    """The largest ln((TPR_lo − δ)/FPR_hi) over the tests "score ≥ t" at every cut between sorted scores, with
    Bonferroni over all n_in + n_out + 1 cuts (so picking the best one after looking is allowed) and α/2 for
    each of the two rates. Higher scores must mean "more likely inserted"."""
    ins, out = np.sort(np.asarray(inserted, np.float64)), np.sort(np.asarray(held_out, np.float64))
    if ins.size == 0 or out.size == 0:
        raise ValueError("need inserted and held-out canaries")
    cuts = np.concatenate([np.unique(np.concatenate([ins, out])), [np.inf]])
    tests = ins.size + out.size + 1
    alpha = (1 - confidence) / (2 * tests)
    tp = ins.size - np.searchsorted(ins, cuts, side="left")
    fp = out.size - np.searchsorted(out, cuts, side="left")
    with np.errstate(divide="ignore", invalid="ignore"):  # the same one-sided bounds as `clopper_pearson`, vectorised
        tpr_lo = np.where(tp > 0, st.beta.ppf(alpha, tp, ins.size - tp + 1), 0.0)
        fpr_hi = np.where(fp < out.size, st.beta.ppf(1 - alpha, fp + 1, out.size - fp), 1.0)
        eps = np.where(tpr_lo > delta, np.log(np.maximum(tpr_lo - delta, 1e-300) / fpr_hi), -np.inf)
    i = int(np.argmax(eps))
    if not eps[i] > 0:
        return MembershipBound(0.0, None, 0.0, 0.0, tests)
    return MembershipBound(float(eps[i]), float(cuts[i]), int(tp[i]) / ins.size, int(fp[i]) / out.size, tests)
