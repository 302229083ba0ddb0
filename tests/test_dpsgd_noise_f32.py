"""The fast float32 keyed Gaussian (`SecureRandom.normal_f32`, device DP-SGD noise): a standard normal by moments,
KS and tail counts, keyed (same key replays, other keys/indices/purposes differ), chunk-independent, and
independent of the float64 stream of the same (index, purpose)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from pflm import secure_random
from pflm.errors import ConfigError
from pflm.secure_random import SecureRandom, derive_key, new_key

N = 1_000_000


@pytest.fixture(scope="module")
def draw() -> np.ndarray:
    return SecureRandom(derive_key(7)).normal_f32(0, N, 1.0, "noise").double().numpy()


def test_moments_and_ks(draw):
    assert draw.dtype == np.float64 and np.isfinite(draw).all()
    se = 1 / math.sqrt(N)
    assert abs(draw.mean()) < 5 * se
    assert abs(draw.var() - 1) < 5 * math.sqrt(2) * se
    assert abs(stats.skew(draw)) < 5 * math.sqrt(6) * se
    assert abs(stats.kurtosis(draw)) < 5 * math.sqrt(24) * se  # excess kurtosis 0
    assert stats.kstest(draw, "norm").pvalue > 1e-4
    # the two halves of each Box–Muller pair are uncorrelated
    pairs = draw.reshape(-1, 2)
    assert abs(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]) < 5 * math.sqrt(2 / N)


def test_tails_have_the_normal_rate(draw):
    for t in (3.0, 4.0):
        expect = N * 2 * stats.norm.sf(t)
        got = int((np.abs(draw) > t).sum())
        assert abs(got - expect) < 6 * math.sqrt(expect) + 1, (t, got, expect)
    assert np.abs(draw).max() <= math.sqrt(-2 * math.log(2.0 ** -53)) + 1e-4  # the float64 path's support


def test_keyed_and_reproducible():
    key = new_key()
    a = SecureRandom(key).normal_f32(3, 10_001, 0.7, "noise")
    assert a.dtype == torch.float32 and a.shape == (10_001,)
    assert torch.equal(a, SecureRandom(key).normal_f32(3, 10_001, 0.7, "noise"))  # same key replays
    assert torch.equal(a[:5_000], SecureRandom(key).normal_f32(3, 5_000, 0.7, "noise"))  # a prefix of the stream
    for other in (SecureRandom(new_key()).normal_f32(3, 10_001, 0.7, "noise"),
                  SecureRandom(key).normal_f32(4, 10_001, 0.7, "noise"),
                  SecureRandom(key).normal_f32(3, 10_001, 0.7, "update"),
                  SecureRandom(key).normal(3, 10_001, 0.7, "noise")):  # the float64 stream is a different one
        assert float((a - other).abs().max()) > 1.0
        assert abs(float(np.corrcoef(a.numpy(), other.float().numpy())[0, 1])) < 0.05
    std = SecureRandom(key).normal_f32(3, (7, 11), 2.5, "noise")
    assert std.shape == (7, 11)
    torch.testing.assert_close(std.reshape(-1), 2.5 / 0.7 * a[:77])
    with pytest.raises(ConfigError):
        SecureRandom(key).normal_f32(0, 3, float("nan"))


def test_chunking_does_not_change_the_stream(monkeypatch):
    key = new_key()
    whole = SecureRandom(key).normal_f32(0, 3_001, 1.0)
    monkeypatch.setattr(secure_random, "_F32_PAIRS_PER_CHUNK", 64)  # 12 B per pair: chunks end mid-stream
    torch.testing.assert_close(SecureRandom(key).normal_f32(0, 3_001, 1.0), whole, rtol=0, atol=0)
