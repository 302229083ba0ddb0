"""Paired bootstrap CI (Bisani & Ney 2004), permutation and sign tests, tail-word metrics: hand-made known answers."""

import numpy as np
import pytest

from pflm.errors import DataError
from pflm.evaluation.compare import utterance_users
from pflm.evaluation.significance import (
    bootstrap_wer, cluster_paired_bootstrap, paired_bootstrap, permutation_test, sign_test,
)
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


def test_user_bootstrap_sees_that_one_user_carries_the_gain():
    # User u0 has 10 one-word utterances, all fixed by B; users u1..u9 have one utterance each, unchanged.
    a = [1] * 10 + [0] * 9
    b = [0] * 10 + [0] * 9
    n = [1] * 19
    users = ["u0"] * 10 + [f"u{i}" for i in range(1, 10)]
    by_utt = paired_bootstrap(a, b, n, resamples=4000, seed=0)
    by_user = cluster_paired_bootstrap(a, b, n, users, resamples=4000, seed=0)
    assert by_utt.delta == by_user.delta == pytest.approx(-10 / 19)
    assert by_utt.excludes_zero  # 10 of 19 utterances improve: utterance resampling never draws none of them
    # resampling users, u0 is missing from a replicate with probability (9/10)^10 = 0.35: the CI reaches 0
    assert by_user.high == 0.0 and not by_user.excludes_zero
    assert by_user.prob_improvement == pytest.approx(1 - 0.9**10, abs=0.03)


def test_user_bootstrap_with_one_utterance_per_user_is_the_utterance_bootstrap():
    rng = np.random.default_rng(5)
    a, b, n = rng.integers(0, 4, 50), rng.integers(0, 4, 50), rng.integers(3, 12, 50)
    assert cluster_paired_bootstrap(a, b, n, [f"s{i}" for i in range(50)], resamples=300, seed=2) == \
        paired_bootstrap(a, b, n, resamples=300, seed=2)
    with pytest.raises(DataError, match="groups must label every utterance"):
        cluster_paired_bootstrap(a, b, n, ["x"] * 49)


def test_users_come_from_nbest_utterance_ids():
    assert list(utterance_users(["u1-3", "u1-7", "test-u2-0"])) == ["u1", "u1", "test-u2"]
    assert utterance_users(["sent-00001", "sent-00002"]) is None  # a sentence file: every utterance its own group
    assert utterance_users(["a", "b"]) is None


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
