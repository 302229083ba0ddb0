"""The federated training core: clipping, noise on the aggregate, accounting, PEU invariants, resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from pflm.aggregator.plain import PlainSumAggregator
from pflm.config import load_recipe
from pflm.secure_random import subkey
from pflm.device.update import device_update
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"


def make_sim(data, tmp_path, **extra) -> Simulator:
    return Simulator(load_recipe(RECIPE, tiny_overrides(data, str(tmp_path), **extra)))


def test_clipped_updates_never_exceed_bound(synthetic_data, tmp_path):
    sim = make_sim(synthetic_data, tmp_path, **{"privacy.clip_bound": 0.05, "device.lr": 2.0})
    plan = sim.server.plan_round(0)
    sim.fanout.trainer.load_round(0, plan.device_state, plan.rows)
    clipped = 0
    for user in plan.cohort:
        key = subkey(sim.run_key, "device", 0, user)  # the key the simulator gives this device
        res, vec, aux = device_update(sim.fanout.trainer, sim.server.postprocessors, plan.ctx, user, sim.fd.user_tokens("train", user), key)
        assert float(vec.norm()) <= 0.05 * (1 + 1e-6)
        assert float(res.update.norm()) > 0
        clipped += aux["clipped"]
        if float(res.update.norm()) <= 0.05:
            assert torch.equal(vec, res.update)
    assert clipped >= 1  # lr 2.0 with C=0.05: at least one device must have been clipped


def test_noise_on_aggregate_has_std_sigma_c(synthetic_data, tmp_path):
    sim = make_sim(synthetic_data, tmp_path, **{"privacy.noise_multiplier": 1.5, "privacy.clip_bound": 0.2})
    plan = sim.server.plan_round(0)
    agg = PlainSumAggregator()
    agg.begin(plan.ctx)
    for user in plan.cohort:  # all-zero updates: whatever the server sees is the noise
        agg.add(user, torch.zeros(plan.ctx.dim), 1.0)
    result = agg.finalize()
    noise_pp = sim.server.postprocessors[-1]
    noisy, _ = noise_pp.on_server(result, plan.ctx)
    std = float(noisy.total.double().std())
    assert plan.ctx.dim > 10_000
    assert abs(std - 1.5 * 0.2) < 0.03 * 0.3


def test_epsilon_matches_opacus_accountant(synthetic_data, tmp_path):
    sim = make_sim(synthetic_data, tmp_path, **{"privacy.noise_multiplier": 0.9, "server.rounds": 3, "privacy.delta": 1e-5})
    summary = sim.run(progress=False)
    q = 5 / sim.population
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=0.9, sample_rate=q)
    assert summary["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)
    assert summary["noise_cohort"] == 5 and summary["privacy_population"] == sim.population
    # the public release history an ensemble composes (pflm.evaluation.ensemble) reproduces the printed ε
    assert summary["accountant_history"] == [[0.9, q, 3]]
    assert "population of" in summary["epsilon_refers_to"]
    for key in ("val_perplexity", "test_perplexity", "test_word_perplexity", "epsilon", "delta", "rounds",
                "cohort_size", "noise_multiplier", "clip_bound", "wall_seconds", "params"):
        assert key in summary


def test_noise_cohort_setting_accounts_for_population(synthetic_data, tmp_path):
    sim = make_sim(synthetic_data, tmp_path, **{
        "privacy.target_epsilon": 2.0, "privacy.population": 1_000_000,
        "privacy.noise_cohort": 5000, "server.rounds": 2000, "privacy.delta": 1e-6,
    })
    # σ calibrated for 2000 rounds at q = 5000/1e6 (pfl-research's StackOverflow setting)
    assert 0.7 < sim.server.privacy.noise_multiplier < 1.1
    assert sim.server.privacy.q == pytest.approx(0.005)


def test_peu_rows_outside_selection_bit_identical(synthetic_data, tmp_path):
    sim = make_sim(synthetic_data, tmp_path, **{"peu.mode": "sampled", "peu.k": 40, "privacy.noise_multiplier": 1.0,
                                                "server.rounds": 1})
    before = {k: v.clone() for k, v in sim.server.model.state_dict().items()}
    plan = sim.server.plan_round(0)
    m = sim.run_round(0)
    assert "failed" not in m
    after = sim.server.model.state_dict()
    rows = plan.rows
    outside = torch.ones(sim.vocab_size, dtype=torch.bool)
    outside[rows] = False
    for name in sim.server.vocab_names:
        assert torch.equal(before[name][outside], after[name][outside]), name
        # noise lands on every selected row (with σ>0 every selected row changes)
        changed = (before[name][rows] != after[name][rows]).reshape(rows.numel(), -1).any(1)
        assert bool(changed.all()), name


def test_nonfinite_update_is_dropped_and_counted(synthetic_data, tmp_path, monkeypatch):
    sim = make_sim(synthetic_data, tmp_path)
    real_train = sim.fanout.trainer.train
    bad_user = {}

    def poisoned(user_id, sentences, device_key):
        res = real_train(user_id, sentences, device_key)
        if not bad_user:
            bad_user["id"] = user_id
            res.update[0] = float("nan")
        return res

    monkeypatch.setattr(sim.fanout.trainer, "train", poisoned)
    m = sim.run_round(0)
    assert m["nonfinite_dropped"] == 1
    assert m["contributors"] == m["cohort"] - 1
    assert all(bool(torch.isfinite(p).all()) for p in sim.server.model.parameters())


def test_run_writes_metrics_summary_and_beats_nothing_broken(synthetic_data, tmp_path):
    sim = make_sim(synthetic_data, tmp_path, **{"server.rounds": 4, "server.eval_every": 2})
    summary = sim.run(progress=False)
    lines = [json.loads(x) for x in (tmp_path / "tiny_synthetic" / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [0, 1, 2, 3]
    assert "val_perplexity" in lines[1] and "val_perplexity" in lines[3]
    assert math.isfinite(summary["test_word_perplexity"])
    assert (tmp_path / "tiny_synthetic" / "model.safetensors").exists()
