"""Distributed DP through the secure aggregator: exactness of the released sum, the survivors' noise distribution,
what the server (the attacker here) can see, refusals, and an end-to-end run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pflm.aggregator.secagg import SecAggConfig, SecureAggregator
from pflm.config import load_recipe
from pflm.errors import ConfigError
from pflm.privacy.distributed.codec import CodecScale, codec_for_round
from pflm.privacy.distributed.discrete import device_generator, discrete_gaussian, skellam
from pflm.privacy.distributed.rotation import Rotation, rotation_seed
from pflm.round import RoundContext
from pflm.secure_random import subkey
from tests.conftest import tiny_overrides

DIM, N, C, RUN_KEY = 3000, 6, 1.0, bytes(range(32))


def _round(mechanism: str, mode: str, share_var: float, drop: tuple[int, ...] = (), seed: int = 7):
    """One secure round of N devices with distributed noise; returns the aggregator, codec, updates, device keys."""
    gamma = 300.0
    scale = CodecScale(mechanism, gamma, gamma * C + np.sqrt(DIM), share_var, 24)
    agg = SecureAggregator(SecAggConfig(mode=mode, bits=32, keep_transcript=True), seed=seed, run_key=RUN_KEY)
    codecs = []

    def factory(ctx, n, keys, workers):
        codecs.append(codec_for_round(scale, ctx.dim, rotation_seed(ctx.seed, ctx.round), 1024, 32, n, keys, 1.0,
                                      1.0, C))
        return codecs[-1]

    agg.codec_factory = factory
    ctx = RoundContext(round=3, dim=DIM, cohort=list(range(10, 10 + N)), clip_bound=C, seed=seed)
    agg.begin(ctx)
    rng = np.random.default_rng(seed)
    updates = {}
    for u in ctx.cohort:
        x = rng.standard_normal(DIM).astype(np.float32)
        x *= np.float32(0.9 * C / np.linalg.norm(x.astype(np.float64)))
        updates[u] = x
        if u in drop:
            agg.drop(u)
            continue
        agg.receive(agg.upload(u, torch.from_numpy(x), 1.0, {}))
    result = agg.finalize()
    keys = {u: subkey(subkey(RUN_KEY, "secagg-rounding"), "upload", ctx.round, u) for u in ctx.cohort}
    return agg, codecs[0], updates, keys, result


@pytest.mark.parametrize("mechanism,mode", [("distributed_skellam", "full"), ("distributed_dgauss", "simulate")])
def test_released_sum_is_the_rotated_back_sum_of_quantised_updates_and_noise_shares(mechanism, mode):
    """The revealed sum equals R⁻¹((Σ x̃_u + Σ z_u) mod 2^m)/γ exactly: recompute every surviving device's rounding
    and noise share from its key and compare integers bit for bit; dropped devices add nothing."""
    agg, codec, updates, keys, result = _round(mechanism, mode, 50.0, drop=(12,))
    survivors = [u for u in updates if u != 12]
    expect = sum(codec.quantise(updates[u], keys[u]) + codec.noise_share(keys[u]) for u in survivors)
    got = codec.centred(agg.last_sum)
    assert np.array_equal(got, expect)
    assert np.array_equal(result.total.numpy(), codec.rotation.inverse(expect / codec.scale.gamma).astype(np.float32))
    assert result.num_contributors == N - 1 and result.weight_sum == pytest.approx(N - 1, abs=1e-6)


def test_server_view_minus_true_sum_has_the_calibrated_noise():
    """Attacker = the server: everything it holds (the unmasked integer sum, the decoded release) differs from the
    noise-free sum by noise of the calibrated variance — it never sees Σ x̃ alone. Fails if shares are missing."""
    share_var = 400.0
    agg, codec, updates, keys, result = _round("distributed_skellam", "full", share_var)
    quantised = sum(codec.quantise(updates[u], keys[u]) for u in updates)
    residual = codec.centred(agg.last_sum) - quantised  # the server's view minus the noise-free integer sum
    assert residual.var() == pytest.approx(N * share_var, rel=0.08)
    true_sum = np.sum([updates[u].astype(np.float64) for u in updates], axis=0)
    err = result.total.numpy().astype(np.float64) - true_sum
    noise_std = np.sqrt(N * share_var) / codec.scale.gamma  # rounding adds ≤ N/4 more (integer units²)
    assert err.std() == pytest.approx(noise_std, rel=0.1)
    # a single device's masked vector is uniform mod 2^32 (masks), and its unmasked encoding carries its own share
    own = codec.quantise(updates[10], keys[10]) + codec.noise_share(keys[10])
    assert (own - codec.quantise(updates[10], keys[10])).var() == pytest.approx(share_var, rel=0.15)
    masked = agg.transcript["masked"][10].astype(np.float64)
    assert abs(masked.mean() / 2**32 - 0.5) < 0.02


def test_survivors_noise_has_the_distribution_the_accountant_assumes():
    """Moments of the sum of n shares: Skellam shares sum to Sk(nλ, nλ) (variance 2nλ, 4th cumulant 2nλ);
    discrete Gaussian shares N_Z(0, σ²) with σ ≥ 1 sum to variance nσ² and ~0 excess kurtosis."""
    n, size, lam, s2 = 8, 200_000, 3.0, 4.0
    sk = sum(skellam(device_generator(subkey(RUN_KEY, "t", i)), lam, size) for i in range(n)).astype(np.float64)
    mu = n * lam
    assert abs(sk.mean()) < 4 * np.sqrt(2 * mu / size)
    assert sk.var() == pytest.approx(2 * mu, rel=0.02)
    k4 = np.mean(sk**4) - 3 * sk.var() ** 2
    assert k4 == pytest.approx(2 * mu, abs=0.3 * 2 * mu + 3)
    dg = sum(discrete_gaussian(device_generator(subkey(RUN_KEY, "g", i)), s2, size) for i in range(n)).astype(np.float64)
    assert dg.var() == pytest.approx(n * s2, rel=0.02)
    assert abs(np.mean(dg**4) / dg.var() ** 2 - 3) < 0.05
    # one share: the pmf itself (discrete Gaussian with σ² = 0.5) against exp(−k²/2σ²)/Z
    one = discrete_gaussian(device_generator(bytes(32)), 0.5, 400_000)
    ks = np.arange(-4, 5)
    p = np.exp(-ks.astype(float) ** 2 / 1.0)
    p /= p.sum()
    assert np.abs(np.array([(one == k).mean() for k in ks]) - p).max() < 0.004


def test_rotation_is_orthogonal_and_flattens():
    r = Rotation(5000, rotation_seed(1, 2), block=1024)
    x = np.zeros(5000)
    x[:50] = 1.0  # a spiky vector (a few embedding rows)
    y = r.forward(x)
    assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(x))
    assert np.abs(y).max() < 6 * np.linalg.norm(x) / np.sqrt(r.padded)
    assert np.allclose(r.inverse(y), x, atol=1e-12)


@pytest.mark.parametrize("override,needle", [
    ("aggregation.kind=plain", "aggregation=secure"),
    ("aggregation.secagg.rounding=seeded", "rounding=urandom"),
    ("backend=flower aggregation.secagg.mode=simulate", "mode=full"),
    ("privacy.accountant=prv", "accountant=rdp"),
])
def test_unsafe_recipes_are_refused(override, needle):
    base = ["privacy.mechanism=distributed_skellam", "aggregation.kind=secure", "privacy.target_epsilon=2",
            "privacy.noise_multiplier=null"]
    with pytest.raises(ConfigError, match=needle):
        load_recipe("recipes/tiny_synthetic.yaml", base + override.split())


def test_end_to_end_run_accounts_the_survivors(synthetic_data, tmp_path):
    """A tiny run: the server adds no noise, ε comes from the discrete accountant and stays ≤ target when nobody
    drops; with simulated dropouts beyond the tolerance each round charges fewer shares (larger ε per round)."""
    from pflm.simulation.simulator import Simulator

    common = dict(**{"privacy.mechanism": "distributed_skellam", "aggregation.kind": "secure",
                     "aggregation.secagg.mode": "simulate", "privacy.target_epsilon": 6,
                     "privacy.noise_multiplier": "null", "privacy.population": 100000, "privacy.noise_cohort": 1000,
                     "server.rounds": 2})
    s = Simulator(load_recipe("recipes/tiny_synthetic.yaml",
                              tiny_overrides(synthetic_data, str(tmp_path), name="a", **common))).run(progress=False)
    d = s["distributed_dp"]
    assert s["mechanism"] == "distributed_skellam" and 0 < s["epsilon"] <= 6
    assert all(shares == d["min_survivors"] for shares, _, _ in d["history"])
    assert s["noise_multiplier"] >= s["central_noise_multiplier"]
    drop = Simulator(load_recipe("recipes/tiny_synthetic.yaml", tiny_overrides(
        synthetic_data, str(tmp_path), name="b", **common, **{"aggregation.secagg.dropout_masked_input": 0.4})))
    s2 = drop.run(progress=False)
    charged = [shares for shares, _, n in s2["distributed_dp"]["history"] for _ in range(n)]
    assert charged and min(charged) < d["min_survivors"]
