"""Secure Gaussian noise: distribution, determinism per (key, round, purpose), independence, server postprocessor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pflm.round import AggregateResult, RoundContext
from pflm.errors import ConfigError
from pflm.privacy.noise import GaussianNoisePostprocessor
from pflm.secure_random import SecureRandom, derive_key

N = 200_000


def _gen(seed: int = 7) -> SecureRandom:
    return SecureRandom(derive_key(seed))


def test_standard_normal_distribution():
    z = _gen().standard_normal(0, N).numpy()
    assert abs(z.mean()) < 5 / math.sqrt(N)
    assert z.std() == pytest.approx(1.0, rel=5 * math.sqrt(0.5 / N))
    assert stats.kstest(z, "norm").pvalue > 1e-4
    assert np.isfinite(z).all()
    # tails are present and in proportion: P(|z| > 3) = 0.0027
    assert abs((np.abs(z) > 3).mean() - 0.0027) < 6 * math.sqrt(0.0027 / N)


def test_std_scaling_and_shape():
    x = _gen().normal(3, (400, 500), std=2.5)
    assert x.shape == (400, 500) and x.dtype == torch.float32
    assert float(x.double().std()) == pytest.approx(2.5, rel=0.01)


def test_same_key_round_purpose_is_identical_and_history_free():
    a = _gen().normal(5, 1001, 1.0)
    g = _gen()
    for r in range(5):  # drawing earlier rounds first must not change round 5 (exact resume)
        g.normal(r, 10_000, 1.0)
    b = g.normal(5, 1001, 1.0)
    assert torch.equal(a, b)
    # a longer draw extends the shorter one (same stream)
    assert torch.equal(_gen().normal(5, 2000, 1.0)[:1001], a)


def test_rounds_purposes_and_keys_give_independent_draws():
    g = _gen()
    base = g.standard_normal(0, N).numpy()
    others = [
        g.standard_normal(1, N).numpy(),
        g.standard_normal(0, N, purpose="clip-count").numpy(),
        _gen(8).standard_normal(0, N).numpy(),
    ]
    for o in others:
        assert not np.array_equal(base, o)
        assert abs(np.corrcoef(base, o)[0, 1]) < 5 / math.sqrt(N)


def test_derive_key():
    assert derive_key(1) == derive_key(1) != derive_key(2)
    assert len(derive_key(None)) == 32 and derive_key(None) != derive_key(None)
    with pytest.raises(ConfigError):
        SecureRandom(b"short")
    with pytest.raises(ConfigError):
        derive_key("1")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        _gen().normal(-1, 3, 1.0)


def _ctx(m: int, clip: float, round_: int = 0, dim: int = N) -> RoundContext:
    return RoundContext(round=round_, dim=dim, cohort=list(range(m)), clip_bound=clip, seed=0)


def test_postprocessor_noise_std_is_sigma_times_c():
    sigma, clip = 1.5, 2.0
    pp = GaussianNoisePostprocessor(sigma, _gen(), expected_cohort=10)
    agg = AggregateResult(total=torch.zeros(N), weight_sum=10.0, num_contributors=10)
    out, metrics = pp.on_server(agg, _ctx(10, clip))
    assert float(out.total.double().std()) == pytest.approx(sigma * clip, rel=0.01)
    assert metrics["noise_std_sum"] == pytest.approx(sigma * clip)
    assert metrics["noise_std_mean"] == pytest.approx(sigma * clip / 10)
    assert torch.count_nonzero(agg.total) == 0  # input not modified in place


def test_postprocessor_noise_cohort_scaling():
    sigma, clip, m, big_m = 1.0, 0.5, 40, 1000
    pp = GaussianNoisePostprocessor(sigma, _gen(), expected_cohort=m, noise_cohort=big_m)
    agg = AggregateResult(total=torch.zeros(N), weight_sum=float(m), num_contributors=m)
    out, metrics = pp.on_server(agg, _ctx(m, clip))
    expected_sum_std = sigma * clip * m / big_m
    assert float(out.total.double().std()) == pytest.approx(expected_sum_std, rel=0.01)
    # the average over the simulated cohort has the deployment's noise std σ·C/M
    assert float((out.total.double() / m).std()) == pytest.approx(sigma * clip / big_m, rel=0.01)
    assert metrics["noise_std_mean"] == pytest.approx(sigma * clip / big_m)


def test_postprocessor_round_dependence_and_zero_sigma():
    pp = GaussianNoisePostprocessor(1.0, _gen(), expected_cohort=1)
    agg = AggregateResult(total=torch.ones(1000), weight_sum=1.0, num_contributors=1)
    a, _ = pp.on_server(agg, _ctx(1, 1.0, round_=0, dim=1000))
    b, _ = pp.on_server(agg, _ctx(1, 1.0, round_=0, dim=1000))
    c, _ = pp.on_server(agg, _ctx(1, 1.0, round_=1, dim=1000))
    assert torch.equal(a.total, b.total) and not torch.equal(a.total, c.total)
    off = GaussianNoisePostprocessor(0.0, _gen(), expected_cohort=1)
    same, metrics = off.on_server(agg, _ctx(1, 1.0, dim=1000))
    assert torch.equal(same.total, agg.total) and metrics["noise_std_sum"] == 0.0
    with pytest.raises(ConfigError):
        GaussianNoisePostprocessor(-1.0, _gen(), expected_cohort=1)


def test_noise_std_follows_the_expected_cohort_not_the_realised_one():
    """Poisson sampling: the realised cohort varies (and is private); scaling the noise by it would both leak it
    and add too little noise (the review measured ε ≈ 5–8 for runs calibrated to ε = 2)."""
    pp = GaussianNoisePostprocessor(1.0, _gen(), expected_cohort=20, noise_cohort=20)
    stds = []
    for realised in (3, 20, 41):
        agg = AggregateResult(total=torch.zeros(N), weight_sum=float(realised), num_contributors=realised)
        out, metrics = pp.on_server(agg, _ctx(realised, 1.0))
        stds.append(float(out.total.double().std()))
        assert metrics["noise_std_sum"] == 1.0
    assert stds == pytest.approx([1.0] * 3, rel=0.01)
