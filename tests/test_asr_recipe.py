"""The ASR rescoring recipe (recipes/chitchat_asr.yaml) loads, keeps ε = 2 / δ = 1e-6, and its guard allows every round."""

from __future__ import annotations

from pathlib import Path

import pytest

from pflm.config import load_recipe
from pflm.privacy.accountant import RunningAccountant
from pflm.privacy.guard import BudgetGuard
from pflm.privacy.mechanism import DPMechanism, check_data_privacy

ROOT = Path(__file__).resolve().parent.parent
ASR = str(ROOT / "recipes" / "chitchat_asr.yaml")
DEFAULT = str(ROOT / "recipes" / "chitchat_dp.yaml")
PUBLIC = {"vocabulary": "public", "prior": "public", "dp_release": None}
TRAIN_USERS = 788  # chitchat, --max-sentences 1000 (docs/asr_results.md); the noise population is the recipe's


def _mechanism(path: str) -> DPMechanism:
    return DPMechanism(load_recipe(path), TRAIN_USERS, b"\x01" * 32, PUBLIC)


def test_recipe_is_private_with_the_issue_budget():
    cfg = load_recipe(ASR)
    assert cfg.private
    p = cfg.privacy
    assert (p.target_epsilon, p.delta, p.accountant) == (2.0, 1e-6, "rdp")
    assert (p.population, p.noise_cohort, p.clip_bound) == (1_000_000, 5_000, 0.3)
    assert cfg.server.sampling == "poisson" and cfg.server.weighting == "uniform"
    assert cfg.server.init_from.endswith("model.safetensors")  # public pretrained start (provenance checked at run)
    check_data_privacy(cfg, PUBLIC, "data")  # a public-vocabulary data dir is accepted


def test_only_rounds_public_start_averaging_and_server_lr_differ_from_the_default_recipe():
    asr, default = load_recipe(ASR), load_recipe(DEFAULT)
    assert asr.server.rounds > default.server.rounds
    assert (asr.server.lr, default.server.lr) == (0.1, 0.02)  # docs/asr_results.md section 12
    assert asr.server.ema_decay == 0.99 and default.server.ema_decay == 0  # post-processing only
    for section in ("data", "model", "device", "dpsgd", "privacy", "peu", "aggregation", "faults"):
        assert getattr(asr, section) == getattr(default, section), section
    for key in ("cohort_size", "optimizer", "lr_schedule", "beta1", "beta2", "adam_eps", "sampling", "weighting"):
        assert getattr(asr.server, key) == getattr(default.server, key), key


def test_calibration_gives_epsilon_two_with_more_noise_for_more_rounds():
    asr, default = _mechanism(ASR), _mechanism(DEFAULT)
    assert asr.q == pytest.approx(5_000 / 1_000_000)
    assert asr.delta == 1e-6 and asr.guard is not None
    assert 2.0 * (1 - 1e-3) <= asr.budget.epsilon <= 2.0
    assert asr.noise_multiplier > default.noise_multiplier  # more rounds at the same ε: more noise
    assert asr.noise_multiplier == pytest.approx(0.833, abs=0.002)  # 300 rounds; docs/asr_results.md §12


def test_guard_allows_every_planned_round_and_not_many_more():
    cfg = load_recipe(ASR)
    mech = _mechanism(ASR)
    guard = BudgetGuard(cfg.privacy.target_epsilon, mech.accounting_delta)
    affordable = guard.rounds_affordable(RunningAccountant(cfg.privacy.accountant), mech.noise_multiplier, mech.q)
    assert cfg.server.rounds <= affordable < cfg.server.rounds * 1.05  # refuses none, wastes no budget
