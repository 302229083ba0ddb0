"""Device DP-SGD accounting: the per-device sample-level ε is Opacus' accountant for the same (q, σ, steps, δ)."""

from __future__ import annotations

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from pflm.config import load_recipe
from pflm.device.dpsgd import poisson_plan, sample_level_epsilon
from pflm.secure_random import new_key
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides


def test_sample_level_epsilon_matches_measured_values():
    # NOTES.md (Opacus 1.6): q=0.01, σ=1.0, 1000 steps, δ=1e-5 -> RDP 2.101, PRV 1.838
    assert sample_level_epsilon(0.01, 1.0, 1000, 1e-5, "rdp") == pytest.approx(2.101, abs=2e-3)
    assert sample_level_epsilon(0.01, 1.0, 1000, 1e-5, "prv") == pytest.approx(1.838, abs=2e-3)
    assert sample_level_epsilon(0.5, 0.0, 3, 1e-5, "rdp") == float("inf")


def test_poisson_plan():
    assert poisson_plan(64, 16, 1, 0.0) == (0.25, 4)
    assert poisson_plan(10, 16, 2, 0.0) == (1.0, 2)  # fewer sentences than a batch: full batches, no amplification
    assert poisson_plan(100, 16, 3, 0.05) == (0.05, 60)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_device_metric_equals_opacus_accountant(synthetic_data, tmp_path, accountant):
    over = {"dpsgd.enabled": "true", "dpsgd.noise_multiplier": 1.3, "dpsgd.accountant": accountant,
            "dpsgd.delta": 1e-4, "device.epochs": 2, "device.batch_size": 4}
    sim = Simulator(load_recipe("recipes/tiny_synthetic.yaml", tiny_overrides(synthetic_data, str(tmp_path), **over)))
    plan = sim.server.plan_round(0)
    sim.fanout.trainer.load_round(0, plan.device_state, plan.rows)
    seen = set()
    for user in plan.cohort[:3]:
        sents = sim.fd.user_tokens("train", user)
        res = sim.fanout.trainer.train(user, sents, new_key())
        n = res.num_sentences
        q = min(1.0, 4 / n)
        steps = max(1, round(2 / q))
        assert res.metrics["device_sample_rate"] == pytest.approx(q)
        assert res.metrics["device_dp_steps"] == steps == res.metrics["local_steps"]
        acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
        for _ in range(steps):
            acc.step(noise_multiplier=1.3, sample_rate=q)
        assert res.metrics["device_sample_epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-4), rel=1e-6)
        assert res.metrics["device_sample_delta"] == 1e-4
        assert "epsilon" not in res.metrics  # the user-level ε belongs to the server, never to a device
        seen.add(round(res.metrics["device_sample_epsilon"], 6))
    assert len(seen) >= 2  # devices with different data sizes get different sample-level guarantees
