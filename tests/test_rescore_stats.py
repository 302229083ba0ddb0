"""Paired bootstrap CI (Bisani & Ney 2004), permutation and sign tests, tail-word metrics: hand-made known answers."""

import numpy as np
import pytest

from pflm.errors import DataError
from pflm.evaluation.significance import bootstrap_wer, paired_bootstrap, permutation_test, sign_test
from pflm.evaluation.tail_words import oov_rate, rare_predicate, tail_stats, zipf_frequency


def test_identical_systems_have_a_zero_interval_and_p_one():
    a = [1, 0, 3, 2]
    r = paired_bootstrap(a, a, [4, 5, 6, 7], resamples=500)
    assert (r.delta, r.low, r.high, r.prob_improvement) == (0.0, 0.0, 0.0, 0.0)
    assert not r.excludes_zero
    assert permutation_test(a, a).p_value == 1.0
    assert sign_test(a, a).p_value == 1.0


def test_uniform_improvement_is_certain_and_exactly_significant():
    # 10 utterances of 5 words; B makes one error fewer on each: every replicate gives exactly -10/50
    a, b, n = [2] * 10, [1] * 10, [5] * 10
    r = paired_bootstrap(a, b, n, resamples=1000)
    assert r.delta == pytest.approx(-0.2) and r.low == pytest.approx(-0.2) and r.high == pytest.approx(-0.2)
    assert r.prob_improvement == 1.0 and r.excludes_zero
    perm = permutation_test(a, b)
    assert perm.exact and perm.p_value == pytest.approx(2 / 2**10)  # only all-minus and all-plus reach |sum| = 10
    assert sign_test(a, b).p_value == pytest.approx(2 / 2**10)  # binomial(10, 1/2): P(0) + P(10)
    assert (perm.better, perm.worse) == (10, 0)


def test_exact_permutation_p_value_by_hand():
    # d = b - a = (-2, -1, +1, 0): the zero is irrelevant; of the 8 sign patterns of (2, 1, 1) the sums are
    # -4 -2 -2 0 0 2 2 4, and six have |sum| >= |observed| = 2  ->  p = 6/8
    t = permutation_test([3, 2, 0, 1], [1, 1, 1, 1])
    assert t.exact and t.statistic == -2.0 and t.p_value == pytest.approx(0.75)
    assert sign_test([3, 2, 0, 1], [1, 1, 1, 1]).p_value == pytest.approx(1.0)  # 2 better, 1 worse


def test_monte_carlo_permutation_above_the_exact_limit():
    a, b = np.ones(30), np.zeros(30)  # exact p = 2 / 2**30: Monte Carlo sees no extreme pattern
    t = permutation_test(a, b, resamples=999, seed=3)
    assert not t.exact and t.p_value == pytest.approx(1 / 1000)
    balanced = permutation_test(np.r_[np.ones(15), np.zeros(15)], np.r_[np.zeros(15), np.ones(15)], resamples=999)
    assert balanced.p_value == 1.0  # observed sum 0: every pattern is at least as extreme


def test_two_utterance_bootstrap_distribution():
    # utterance 1: B fixes its only word, utterance 2: no change. Replicates: {1,1} -> -1 (1/4), {1,2} -> -1/2 (1/2),
    # {2,2} -> 0 (1/4): the 95% interval is [-1, 0] and P(improvement) = 3/4
    r = paired_bootstrap([1, 0], [0, 0], [1, 1], resamples=20000, seed=1)
    assert r.delta == -0.5 and r.low == -1.0 and r.high == 0.0
    assert r.prob_improvement == pytest.approx(0.75, abs=0.015)


def test_bootstrap_matches_scipy_paired_percentile_interval():
    from scipy.stats import bootstrap

    rng = np.random.default_rng(0)
    n = rng.integers(3, 15, size=300)
    a = rng.binomial(n, 0.2)
    b = np.clip(a - rng.binomial(1, 0.3, size=300) + rng.binomial(1, 0.15, size=300), 0, None)
    ours = paired_bootstrap(a, b, n, resamples=10000, seed=0)
    ref = bootstrap((b - a, n), lambda d, w, axis=-1: d.sum(axis) / w.sum(axis), paired=True, vectorized=True,
                    n_resamples=10000, method="percentile", rng=np.random.default_rng(1))
    assert ours.low == pytest.approx(ref.confidence_interval.low, abs=0.003)
    assert ours.high == pytest.approx(ref.confidence_interval.high, abs=0.003)
    wer, lo, hi = bootstrap_wer(a, n, resamples=2000)
    assert wer == pytest.approx(a.sum() / n.sum()) and lo < wer < hi


def test_bad_inputs_are_refused():
    with pytest.raises(DataError):
        paired_bootstrap([1, 2], [1], [3, 3])
    with pytest.raises(DataError):
        paired_bootstrap([0], [0], [0])


def test_tail_words_by_public_frequency():
    assert zipf_frequency("the") > 7 and zipf_frequency("zyzzyva") < 3 and zipf_frequency("qqxqzpflm") == 0.0
    is_rare = rare_predicate(3.0)
    assert not is_rare("weather") and is_rare("zyzzyva")
    refs = ["the zyzzyva ran", "a xylyl sat", "the cat sat"]
    hyps = ["the zyzzyva run", "a sat", "the cat sat"]
    errors = [1, 1, 0]
    t = tail_stats(refs, hyps, errors, lambda w: w in {"zyzzyva", "xylyl"})
    assert t.rare_utterances == 2 and t.rare_utt_errors == 2 and t.rare_utt_ref_words == 6
    assert t.rare_tokens == 2 and t.rare_hits == 1  # zyzzyva matched, xylyl deleted
    assert t.rare_utt_wer == pytest.approx(2 / 6) and t.rare_recall == 0.5
    # a substitution by the same-looking word is not a hit
    assert tail_stats(["zyzzyva"], ["zyzzyvas"], [1], lambda w: w.startswith("zyz")).rare_hits == 0
    assert oov_rate(["a b c", "a d"], {"a", "b"}) == (2, 5)
