"""Participation limits and the DP-FTRL training path: limits never violated, exact resume, config refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pflm.config import load_recipe
from pflm.errors import ConfigError
from pflm.secure_random import SecureRandom, new_key
from pflm.server.participation import ParticipationScheduler
from pflm.simulation.simulator import Simulator
from tests.conftest import crash_at_round, tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"
FTRL = {"privacy.mechanism": "dpftrl", "server.sampling": "available", "privacy.target_epsilon": 4.0,
        "privacy.noise_multiplier": 0.0, "privacy.clip_bound": 0.5, "server.availability": 0.7,
        "server.min_separation": 3, "server.max_participations": 2, "server.rounds": 6, "server.cohort_size": 6,
        "server.checkpoint_every": 1, "server.eval_every": 6, "privacy.dpftrl.kind": "banded_mf"}


def test_participation_limits_are_never_violated_property():
    """Random populations, cohorts, availabilities and (k, b): every device's rounds are ≥ b apart and ≤ k, the
    cohort only holds available devices, and a fresh scheduler (a resume) replays the same cohorts."""
    rng = np.random.default_rng(7)
    for _ in range(40):
        n_users, cohort = int(rng.integers(5, 80)), int(rng.integers(1, 12))
        p, b, k = float(rng.uniform(0.1, 1.0)), int(rng.integers(1, 6)), int(rng.integers(0, 4))
        key = new_key()
        sched = ParticipationScheduler(n_users, cohort, p, b, k, SecureRandom(key))
        rounds: dict[int, list[int]] = {}
        for r in range(30):
            users, stats = sched.cohort(r)
            assert len(users) <= cohort and len(set(users)) == len(users)
            assert len(users) == min(cohort, stats["eligible_devices"])
            assert stats["eligible_devices"] + stats["skipped_by_participation_limits"] == stats["available_devices"]
            for u in users:
                rounds.setdefault(u, []).append(r)
        for u, rs in rounds.items():
            assert all(b2 - b1 >= b for b1, b2 in zip(rs, rs[1:])), (u, rs, b)
            assert k == 0 or len(rs) <= k
        replay = ParticipationScheduler(n_users, cohort, p, b, k, SecureRandom(key))
        r = int(rng.integers(0, 30))
        assert replay.cohort(r)[0] == sorted(u for u, rs in rounds.items() if r in rs)


def test_availability_limits_who_can_be_chosen():
    sched = ParticipationScheduler(400, 400, 0.25, 1, 0, SecureRandom(new_key()))
    sizes = [len(sched.cohort(r)[0]) for r in range(20)]
    assert 70 < np.mean(sizes) < 130  # ≈ 0.25 · 400 available, all taken


def test_dpftrl_recipe_refusals_are_one_line():
    with pytest.raises(ConfigError, match="server.sampling=available"):
        load_recipe(RECIPE, ["privacy.mechanism=dpftrl", "privacy.noise_multiplier=1.0"])
    with pytest.raises(ConfigError, match="peu.mode=all or peu.mode=topk"):
        load_recipe(RECIPE, ["privacy.mechanism=dpftrl", "server.sampling=available", "peu.mode=sampled", "peu.k=50"])
    with pytest.raises(ConfigError, match="apply only to server.sampling=available"):
        load_recipe(RECIPE, ["server.min_separation=5"])
    with pytest.raises(ConfigError, match="Poisson"):
        load_recipe(RECIPE, ["server.sampling=available", "privacy.noise_multiplier=1.0"])


def test_dpftrl_run_resumes_exactly_and_reports_its_guarantee(synthetic_data, tmp_path, monkeypatch):
    """A DP-FTRL run crashed after round 3 and resumed (noise buffers and cohorts re-derived from the key) ends
    with the same weights and ε as an uninterrupted run; metrics.jsonl holds only released keys."""
    ref = Simulator(load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "a"), **FTRL)))
    ref_summary = ref.run(progress=False)
    crashed = Simulator(load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "b"), **FTRL)))
    crash_at_round(crashed, monkeypatch, 4)
    summary = Simulator(load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "b"), **FTRL))).run(progress=False)
    wa = load_file(str(tmp_path / "a" / "tiny_synthetic" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "tiny_synthetic" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert summary["epsilon"] == ref_summary["epsilon"] and 3.99 < summary["epsilon"] <= 4.0
    priv = json.loads((tmp_path / "a" / "tiny_synthetic" / "summary.json").read_text())
    text = json.dumps(priv)
    assert "NO amplification" in text and '"dpftrl"' in text
    rows = [json.loads(x) for x in (tmp_path / "a" / "tiny_synthetic" / "metrics.jsonl").read_text().splitlines()]
    assert not any("skipped_by_participation_limits" in r or "available_devices" in r for r in rows)
    changed = tiny_overrides(synthetic_data, str(tmp_path / "b"), **{**FTRL, "server.min_separation": 2})
    with pytest.raises(Exception, match="min_separation|recipe"):
        Simulator(load_recipe(RECIPE, changed)).run(progress=False)
