"""Secure-aggregation fixed-point rounding, attacked: no rounding outcome may raise a contribution above C.

Stochastic rounding moves each coordinate by up to one quantisation step 1/s, so a clipped update of norm C
could decode to norm C + √d/s — a larger sensitivity than the accountant assumes. These tests build the
vectors that rounding hurts most and check the decoded per-device vector over many fresh rounding draws.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pflm.aggregator.base import RoundContext
from pflm.aggregator.secagg import SecAggConfig, SecureAggregator
from pflm.aggregator.secagg.fixed_point import ROUNDING_MARGIN, FixedPointCodec
from pflm.errors import ConfigError

COHORT = [3, 11, 19]  # the smallest cohort secure aggregation accepts: the largest level L, the finest grid


def adversarial(d: int, C: float, step: float, frac: float, seed: int = 0) -> np.ndarray:
    """float32 vector of norm C (to float32 precision, never above) whose coordinates sit at `frac` of a grid
    cell away from zero (frac≈0.5: the largest rounding variance; frac≈1: just below a grid point, so rounding
    up — away from zero — is almost certain), random signs; the last coordinate balances the norm to C."""
    rng = np.random.default_rng(seed)
    base = C / math.sqrt(d)
    m = np.floor(base / step) - 1  # a cell below C/√d, so the balancing coordinate has room
    x = np.full(d, (m + frac) * step)
    rest = C**2 - float(np.dot(x[:-1], x[:-1]))
    assert rest > 0
    x[-1] = math.sqrt(rest)
    x *= rng.choice([-1.0, 1.0], size=d)
    y = x.astype(np.float32)

    def norm() -> float:
        return float(np.linalg.norm(y.astype(np.float64)))

    # float32 rounding leaves the norm ~1e-9 off C: fine-tune the small coordinate 0 (ulp ≈ 1e-13 of the norm²)
    y[0] = np.float32(math.copysign(math.sqrt(float(y[0]) ** 2 + C**2 - norm() ** 2), float(y[0])))
    while norm() > C:
        y[0] = np.nextafter(y[0], np.float32(0))
    assert norm() >= C * (1 - 1e-11)
    return y


def simulate_agg(d: int, C: float, bits: int, **cfg) -> SecureAggregator:
    agg = SecureAggregator(SecAggConfig(mode="simulate", bits=bits, **cfg))
    agg.begin(RoundContext(round=0, dim=d, cohort=list(COHORT), clip_bound=C, seed=1))
    return agg


def decoded_norms(agg: SecureAggregator, x: np.ndarray, draws: int) -> np.ndarray:
    """Norms of one device's decoded contribution over `draws` independent uploads (fresh rounding each)."""
    t = torch.from_numpy(x)
    out = []
    for _ in range(draws):
        up = agg.upload(COHORT[0], t, 1.0, {})
        assert up.excluded is None
        dec = agg.codec.decode(up.payload)  # a single device's integers: |k| ≤ L, so this is its exact view
        out.append(float(np.linalg.norm(dec.update)))
    return np.array(out)


@pytest.mark.parametrize("frac", [0.5, 0.999, 0.02])
def test_rounding_never_lifts_a_clipped_update_above_c_16_bits(frac: float) -> None:
    d, C, bits = 10_000, 1.0, 16  # slack √d/s ≈ 0.92 % of C: just inside the 1 % limit
    agg = simulate_agg(d, C, bits)
    codec = FixedPointCodec(bits, len(COHORT), d, C, 1.0, (), 1.0)
    x = adversarial(d, C, 1.0 / codec.value_scale, frac)
    norms = decoded_norms(agg, x, 300)
    assert norms.max() <= C, norms.max() - C
    # the shrinking costs at most the slack (plus float32 rounding), never more
    assert norms.min() >= C - 2.5 * codec.rounding_slack()
    assert agg.codec.rounding_slack() == pytest.approx(math.sqrt(d) * (1 + ROUNDING_MARGIN) / codec.value_scale)


def test_unprotected_rounding_does_lift_the_norm() -> None:
    """Negative control: the same vector encoded without the device's shrinking step exceeds C on most draws
    (what the aggregator did before; the test above would fail there)."""
    d, C = 10_000, 1.0
    codec = FixedPointCodec(16, len(COHORT), d, C, 1.0, (), 1.0)
    x = adversarial(d, C, 1.0 / codec.value_scale, 0.5)
    norms = [float(np.linalg.norm(codec.decode(codec.encode(x, 1.0, {}, bytes([i]) * 32).ints).update))
             for i in range(50)]
    # the rounding error is zero-mean, so the norm fluctuates around C·(1 + d/(8·s²C²)) and exceeds C often
    assert sum(n > C for n in norms) >= 15 and max(norms) > C * (1 + 2e-5)


def test_large_d_at_32_bits() -> None:
    d, C = 1 << 20, 1.0
    agg = simulate_agg(d, C, 32)
    codec = agg.codec or FixedPointCodec(32, len(COHORT), d, C, 1.0, (), 1.0)
    x = adversarial(d, C, 1.0 / codec.value_scale, 0.5, seed=1)
    norms = decoded_norms(agg, x, 4)
    assert norms.max() <= C
    # without the shrinking the same draws exceed C (the float64 norm resolves the ~1e-13 excess)
    raw = [float(np.linalg.norm(codec.decode(codec.encode(x, 1.0, {}, bytes([i]) * 32).ints).update))
           for i in range(6)]
    assert max(raw) > C


def test_clamping_and_wraparound_never_raise_the_norm() -> None:
    """value_bound_factor < 1 clamps large coordinates (towards zero: the norm can only shrink), and a full
    cohort of extreme vectors sums without wrapping modulo 2^b."""
    d, C = 4096, 1.0
    agg = SecureAggregator(SecAggConfig(mode="simulate", bits=24, value_bound_factor=0.5))
    agg.begin(RoundContext(round=2, dim=d, cohort=list(COHORT), clip_bound=C, seed=1))
    x = np.zeros(d, dtype=np.float32)
    x[0], x[1] = 0.9, -math.sqrt(1 - 0.81)  # x[0] is beyond the coordinate bound 0.5·C: clamped
    for _ in range(50):
        up = agg.upload(COHORT[0], torch.from_numpy(x), 1.0, {})
        dec = agg.codec.decode(up.payload)
        assert dec.clamped == 1 and float(np.linalg.norm(dec.update)) <= C
    # every device at the extreme: a one-hot update of norm C at the coordinate bound (factor 1)
    agg = SecureAggregator(SecAggConfig(mode="simulate", bits=16))
    ctx = RoundContext(round=0, dim=64, cohort=list(COHORT), clip_bound=C, seed=1)
    agg.begin(ctx)
    one_hot = torch.zeros(64)
    one_hot[5] = -C
    for u in COHORT:
        agg.add(u, one_hot, 1.0, {})
    res = agg.finalize()
    assert res.metrics["secagg_wraps"] == 0
    assert -len(COHORT) * C <= float(res.total[5]) < 0  # negative, not wrapped around to a positive value
    assert float(res.total.double().norm()) <= len(COHORT) * C


def test_slack_above_one_percent_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"raise aggregation\.secagg\.bits") as e:
        simulate_agg(20_000, 1.0, 16)  # slack √d/s ≈ 1.3 % of C
    assert "\n" not in str(e.value)
    simulate_agg(20_000, 1.0, 24)  # enough bits: fine


def test_defaults_are_secret_rounding_and_no_plaintext_probe() -> None:
    cfg = SecAggConfig()
    assert cfg.rounding == "urandom" and cfg.measure_quant_error is False
    d = 256
    agg = simulate_agg(d, 1.0, 16)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(d).astype(np.float32) * 0.05)
    a, b = agg.upload(COHORT[0], x, 1.0, {}), agg.upload(COHORT[0], x, 1.0, {})
    assert a.diagnostic is None and b.diagnostic is None  # nothing in the clear travels with the upload
    assert not np.array_equal(a.payload, b.payload)  # fresh rounding per upload, not a function of the seed
    seeded = simulate_agg(d, 1.0, 16, rounding="seeded")
    assert np.array_equal(seeded.upload(COHORT[0], x, 1.0, {}).payload, seeded.upload(COHORT[0], x, 1.0, {}).payload)


def test_caller_tensor_is_not_modified_and_small_updates_pass_unchanged() -> None:
    d, C = 10_000, 1.0
    agg = simulate_agg(d, C, 16, rounding="seeded")
    codec = FixedPointCodec(16, len(COHORT), d, C, 1.0, (), 1.0)
    x = torch.from_numpy(adversarial(d, C, 1.0 / codec.value_scale, 0.5))
    before = x.clone()
    agg.upload(COHORT[0], x, 1.0, {})
    assert torch.equal(x, before)
    small = (x * 0.5).numpy()
    assert codec.shrink_factor(small, C) == 1.0  # well inside C − slack: encoded exactly as before


def test_run_key_rounding_is_secret_but_reproducible() -> None:
    """A simulation hands its secret run key: same key → same rounding (resume), other key or the public seed
    alone → different rounding."""
    from pflm.aggregator.secagg import make_secure_aggregator
    from pflm.secure_random import new_key

    d = 512
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(d).astype(np.float32) * 0.02)
    k = new_key()

    def payload(**kw) -> np.ndarray:
        agg = make_secure_aggregator({"mode": "simulate", "bits": 16}, seed=1, **kw)
        agg.begin(RoundContext(round=4, dim=d, cohort=list(COHORT), clip_bound=1.0, seed=1))
        return agg.upload(COHORT[1], x, 1.0, {}).payload

    a = payload(run_key=k)
    assert np.array_equal(a, payload(run_key=k))
    assert not np.array_equal(a, payload(run_key=new_key()))
    assert not np.array_equal(a, payload())  # no key: fresh draws
    seeded = make_secure_aggregator({"mode": "simulate", "bits": 16, "rounding": "seeded"}, seed=1, run_key=k)
    seeded.begin(RoundContext(round=4, dim=d, cohort=list(COHORT), clip_bound=1.0, seed=1))
    assert not np.array_equal(a, seeded.upload(COHORT[1], x, 1.0, {}).payload)  # not the public-seed stream
