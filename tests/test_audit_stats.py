"""The audit's statistics against closed forms: Secret Sharer exposure, the pair-of-Gaussians ε of Andrew et al.
(2024), Clopper–Pearson bounds, and the validity of the ε lower bound on a mechanism whose ε is known exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats as st

from pflm.errors import ConfigError
from pflm.evaluation.audit_space import SPACES, check_vocabulary, get_space
from pflm.evaluation.audit_stats import (
    clopper_pearson, epsilon_lower_bound, exact_exposure, extrapolated_exposure, gaussian_mechanism_delta,
    gaussian_pair_epsilon, one_run_epsilon,
)
from pflm.secure_random import SecureRandom, derive_key


def test_exact_exposure_is_log2_size_minus_log2_rank() -> None:
    scores = np.arange(1024, dtype=float)  # canary = the most likely phrase → rank 1 → exposure = 10 bits
    assert exact_exposure(1023.0, scores) == pytest.approx(10.0)
    assert exact_exposure(0.0, scores) == pytest.approx(0.0)  # least likely: rank 1024
    assert exact_exposure(1023 - 63.0, scores) == pytest.approx(10 - 6)  # rank 64


def test_extrapolated_exposure_matches_the_exact_rank_on_a_normal_space() -> None:
    """Carlini et al. §4.3: the fitted distribution reproduces the exact rank of a canary in a big space."""
    rng = np.random.default_rng(0)
    space = rng.normal(-30, 4, 200_000)
    sample = rng.choice(space, 5000, replace=False)
    for canary in (-22.0, -16.0, -14.0):  # 2σ, 3.5σ, 4σ above the mean
        exact = exact_exposure(canary, np.append(space, canary))
        for family in ("normal", "skewnorm"):
            assert extrapolated_exposure(canary, sample, family) == pytest.approx(exact, abs=0.6)
    assert extrapolated_exposure(-30.0, sample, "normal") == pytest.approx(1.0, abs=0.1)  # the median: 1 bit


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("delta", [1e-5, 1e-3])
def test_equal_variance_pair_is_the_gaussian_mechanism(mu: float, delta: float) -> None:
    """Two Gaussians N(0, s²), N(μs, s²) are the Gaussian mechanism with Δ/σ = μ: the ε must satisfy Balle & Wang's
    exact δ(ε) (2018, Thm 8)."""
    eps = gaussian_pair_epsilon(0.0, 0.01, mu * 0.01, 0.01, delta)
    assert gaussian_mechanism_delta(eps, mu) == pytest.approx(delta, rel=1e-4)


def test_pair_epsilon_grows_with_separation_and_variance_mismatch() -> None:
    assert gaussian_pair_epsilon(0, 1, 0, 1, 1e-5) == 0.0
    e1, e2 = gaussian_pair_epsilon(0, 1, 1, 1, 1e-5), gaussian_pair_epsilon(0, 1, 2, 1, 1e-5)
    assert 0 < e1 < e2
    assert gaussian_pair_epsilon(0, 1, 1, 1.5, 1e-5) > e1  # a wider alternative has heavier tails: more ε
    assert gaussian_pair_epsilon(0, 1, 1, 1.5, 1e-5) == pytest.approx(gaussian_pair_epsilon(1, 1.5, 0, 1, 1e-5))


def test_one_run_estimate_recovers_the_gaussian_mechanism() -> None:
    """Andrew et al. Alg. 1 on synthetic cosines: observed ~ N(μ/√d, 1/d) against the null N(0, 1/d) must give the
    ε of the Gaussian mechanism with Δ/σ = μ, within its bootstrap interval."""
    d, mu, k = 10_000, 2.0, 1000
    obs = np.random.default_rng(1).normal(mu / math.sqrt(d), 1 / math.sqrt(d), k)
    est = one_run_epsilon(obs, 1e-5, dim=d, resamples=100)
    truth = gaussian_pair_epsilon(0, 1, mu, 1, 1e-5)
    assert est.epsilon_low <= truth <= est.epsilon_high
    assert est.epsilon == pytest.approx(truth, rel=0.15)
    held = np.random.default_rng(2).normal(0, 1 / math.sqrt(d), k)
    fitted = one_run_epsilon(obs, 1e-5, null_scores=held, resamples=100)
    assert fitted.null.startswith("fitted") and fitted.epsilon == pytest.approx(truth, rel=0.2)


def test_clopper_pearson_closed_forms() -> None:
    """All successes / no successes have closed forms: lower = α^(1/n), upper = 1 − α^(1/n)."""
    n, a = 50, 0.025
    assert clopper_pearson(n, n, a)[0] == pytest.approx(a ** (1 / n))
    assert clopper_pearson(0, n, a)[1] == pytest.approx(1 - a ** (1 / n))
    lo, hi = clopper_pearson(20, 50, a)
    assert lo == pytest.approx(st.binomtest(20, 50).proportion_ci(0.95, "exact").low, rel=1e-9)
    assert hi == pytest.approx(st.binomtest(20, 50).proportion_ci(0.95, "exact").high, rel=1e-9)


def test_lower_bound_never_exceeds_the_true_epsilon_of_a_gaussian_mechanism() -> None:
    """The attacker's best membership test on a mechanism of known ε (one Gaussian release per canary, Δ/σ = 2):
    over 40 independent audits the 95%-confidence bound stays below the true ε every time, and it is not vacuous."""
    delta, mu = 1e-5, 2.0
    truth = gaussian_pair_epsilon(0, 1, mu, 1, delta)
    rng = np.random.default_rng(3)
    bounds = [epsilon_lower_bound(rng.normal(mu, 1, 500), rng.normal(0, 1, 500), delta).epsilon_lower for _ in range(40)]
    assert max(bounds) <= truth
    assert min(bounds) > 0.5  # a test that finds nothing would pass the line above trivially


def test_lower_bound_detects_perfect_separation() -> None:
    ins, out = np.ones(48), np.zeros(48)
    b = epsilon_lower_bound(ins, out, 1e-6)
    alpha = 0.05 / (2 * 97)
    assert b.epsilon_lower == pytest.approx(math.log((alpha ** (1 / 48) - 1e-6) / (1 - alpha ** (1 / 48))))
    assert b.tpr == 1 and b.fpr == 0


def test_phrase_spaces_are_enumerable_and_sampled_from_the_keyed_stream() -> None:
    pin = get_space("pin")
    assert pin.size == 10**4 and pin.phrase(4729) == "my code is four seven two nine"
    assert SPACES["phone"].size == 20 * 10**7 and SPACES["phone"].log2_size == pytest.approx(math.log2(2e8))
    rng = SecureRandom(derive_key(0))
    picks = pin.distinct(rng, 0, 50, "t")
    assert len(set(picks)) == 50 and picks == pin.distinct(SecureRandom(derive_key(0)), 0, 50, "t")
    assert picks != pin.distinct(SecureRandom(derive_key(1)), 0, 50, "t")
    with pytest.raises(ConfigError, match="unknown canary space"):
        get_space("ssn")


def test_vocabulary_without_the_space_words_is_refused(private_synthetic_data: str) -> None:
    from pflm.data.store import FederatedData

    tok = FederatedData.open(private_synthetic_data).tokenizer  # 300 words of voice-assistant text: no digits
    with pytest.raises(ConfigError, match="lacks .* canary space 'phone'.*--tokenizer-input wordfreq"):
        check_vocabulary(get_space("phone"), tok)


def test_one_run_estimate_survives_degenerate_resamples() -> None:
    """Four canaries with one repeated value (a bootstrap resample then has std 0) must not crash the audit."""
    est = one_run_epsilon(np.array([0.1, 0.1, 0.1, 0.1]), 1e-6, null_scores=np.array([0.01, 0.01, 0.01, 0.02]))
    assert est.epsilon > 10 and est.epsilon_low <= est.epsilon_high
