"""DP-FTRL noise: the covariance the strategy implies, exact replay after a resume, and secrecy of the stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pflm.errors import ConfigError, PflmError
from pflm.privacy.dpftrl.noise import CorrelatedNoise, CorrelatedNoisePostprocessor, empirical_covariance
from pflm.privacy.dpftrl.strategy import Strategy, make_strategy
from pflm.round import AggregateResult, RoundContext
from pflm.secure_random import SecureRandom, derive_key, new_key
from pflm.server.run_key import load_or_create_run_key

STRATEGIES = {
    "blt": Strategy("blt", 8, 2, 4, buffers=2, omega=(0.35, 0.3), theta=(0.4, 0.9)),
    "banded_mf": make_strategy("banded_mf", 8, 3, 3, bands=3),
    "tree": make_strategy("tree", 8, 1, 0),
}


@pytest.mark.parametrize("kind", sorted(STRATEGIES))
def test_noise_has_the_covariance_the_strategy_implies(kind):
    """Cov(y) = M·Mᵀ with M = C⁻¹ (tree: the difference of consecutive dyadic decompositions), estimated on
    400,000 independent coordinates (at 40,000 the tree's variance-4 entries occasionally missed the 0.06 bound:
    0.088 in one suite run); independent noise (identity covariance) would fail the off-diagonals."""
    s = STRATEGIES[kind]
    m = s.noise_matrix()
    expected = m @ m.T
    got = empirical_covariance(s, SecureRandom(new_key()), 400_000)
    assert np.abs(got - expected).max() < 0.06
    assert np.abs(expected - np.diag(np.diag(expected))).max() > 0.2  # the test would see missing correlation


def _stream(key: bytes, kind: str = "blt") -> CorrelatedNoise:
    return CorrelatedNoise(STRATEGIES[kind], SecureRandom(key))


@pytest.mark.parametrize("kind", sorted(STRATEGIES))
def test_resume_reproduces_the_same_noise_stream(kind):
    key = new_key()
    a = _stream(key, kind)
    ref = [a.noise(t, 50).clone() for t in range(6)]
    resumed = _stream(key, kind)  # a new process after a checkpoint at round 4: nothing but the key survives
    assert torch.equal(resumed.noise(4, 50), ref[4]) and torch.equal(resumed.noise(5, 50), ref[5])
    assert torch.equal(a.noise(2, 50), ref[2])  # asking for an earlier round replays from round 0
    assert not torch.equal(_stream(new_key(), kind).noise(4, 50), ref[4])


def test_noise_cannot_be_recovered_from_the_public_seed():
    """Attacker: knows the recipe (seed) and the release x + noise, and regenerates the noise as a reproducible
    run would. With a secret run key (reproducible=false) the subtraction leaves the noise in place (residual
    ≈ √2 × noise); in reproducible mode the same attack recovers x exactly (so the test can fail)."""
    seed, dim, s = 1234, 4000, STRATEGIES["blt"]
    x = torch.zeros(dim, dtype=torch.float64)
    attacker = [CorrelatedNoise(s, SecureRandom(derive_key(seed))).noise(t, dim) for t in range(3)][-1]
    for reproducible, recovered in ((False, False), (True, True)):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            key = load_or_create_run_key(d, reproducible, seed)
        release = x + [CorrelatedNoise(s, SecureRandom(key)).noise(t, dim) for t in range(3)][-1]
        residual = float((release - attacker - x).norm() / release.norm())
        assert (residual < 1e-12) == recovered, (reproducible, residual)
        if not recovered:
            assert 1.2 < residual < 1.6


def test_postprocessor_scales_by_clip_and_cohorts_and_rejects_a_changing_release_length():
    s = STRATEGIES["banded_mf"]
    key = new_key()
    pp = CorrelatedNoisePostprocessor(s, 2.0, SecureRandom(key), expected_cohort=10, noise_cohort=100)
    agg = AggregateResult(total=torch.zeros(30), weight_sum=1.0, num_contributors=3)
    ctx = RoundContext(round=0, dim=30, cohort=[1, 2, 3], clip_bound=0.5, seed=0)
    out, m = pp.on_server(agg, ctx)
    y = CorrelatedNoise(s, SecureRandom(key)).noise(0, 30)
    assert torch.allclose(out.total.double(), (2.0 * 0.5 * 10 / 100) * y, atol=1e-6)
    assert m["noise_std_sum"] == pytest.approx(0.1)  # row 0 of C⁻¹ has norm 1
    with pytest.raises(ConfigError, match="fixed release vector"):
        pp.on_server(AggregateResult(total=torch.zeros(31), weight_sum=1.0, num_contributors=3),
                     RoundContext(round=1, dim=31, cohort=[1], clip_bound=0.5, seed=0))
    with pytest.raises(PflmError, match="beyond the 8 rounds"):
        pp.stream.noise(8, 30)


def test_streaming_memory_is_buffers_times_release_length():
    d = 1_000_000
    assert CorrelatedNoise(Strategy("blt", 50, 5, 0, buffers=3, omega=(.1, .1, .1), theta=(.5, .6, .7)), SecureRandom(new_key())).memory_bytes(d) == 8 * d * 5
    assert CorrelatedNoise(STRATEGIES["tree"], SecureRandom(new_key())).memory_bytes(d) == 8 * d * 3
