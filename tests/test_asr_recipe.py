"""The ASR rescoring recipes (recipes/chitchat_asr.yaml and its ensemble partner chitchat_asr_30k.yaml) load, compose
to ε = 2 / δ = 1e-6 together, and each one's guard allows its own rounds and no more."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pflm.config import load_recipe
from pflm.epsilon import epsilon_from_history
from pflm.privacy.accountant import RunningAccountant
from pflm.privacy.guard import BudgetGuard
from pflm.privacy.mechanism import DPMechanism, check_data_privacy

ROOT = Path(__file__).resolve().parent.parent
ASR = str(ROOT / "recipes" / "chitchat_asr.yaml")
ASR30K = str(ROOT / "recipes" / "chitchat_asr_30k.yaml")
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
    for section in ("data", "model", "device", "dpsgd", "peu", "aggregation", "faults"):
        assert getattr(asr, section) == getattr(default, section), section
    assert asr.privacy.ensemble_members == 2 and default.privacy.ensemble_members == 1  # docs/asr_results.md §14
    assert dataclasses.replace(asr.privacy, ensemble_members=1) == default.privacy
    for key in ("cohort_size", "optimizer", "lr_schedule", "beta1", "beta2", "adam_eps", "sampling", "weighting"):
        assert getattr(asr.server, key) == getattr(default.server, key), key


def test_calibration_gives_epsilon_two_with_more_noise_for_more_rounds():
    asr, default = _mechanism(ASR), _mechanism(DEFAULT)
    assert asr.q == pytest.approx(5_000 / 1_000_000)
    assert asr.delta == 1e-6 and asr.guard is not None
    assert 2.0 * (1 - 1e-3) <= asr.budget.epsilon <= 2.0  # the pair: 2 members × 300 rounds
    assert asr.noise_multiplier > default.noise_multiplier  # more rounds at the same ε: more noise
    assert asr.noise_multiplier == pytest.approx(0.858, abs=0.002)  # 600 rounds; docs/asr_results.md §14


def test_the_ensemble_partner_differs_only_in_vocabulary_data_and_start_and_the_pair_is_epsilon_two():
    a, b = load_recipe(ASR), load_recipe(ASR30K)
    assert (a.data.dir, b.data.dir) == ("data/chitchat", "data/chitchat30k")
    assert b.server.init_from == "pretrained_wn30k/model.safetensors" and b.peu.mode == "all"
    for section in ("model", "device", "dpsgd", "privacy", "peu", "aggregation", "faults"):
        assert getattr(a, section) == getattr(b, section), section
    assert dataclasses.replace(b.server, init_from=a.server.init_from) == a.server
    ma, mb = _mechanism(ASR), _mechanism(ASR30K)
    assert ma.noise_multiplier == mb.noise_multiplier
    history = [(ma.noise_multiplier, ma.q, a.server.rounds), (mb.noise_multiplier, mb.q, b.server.rounds)]
    assert 2.0 * (1 - 1e-3) <= epsilon_from_history(history, 1e-6) <= 2.0


@pytest.mark.parametrize("path", [ASR, ASR30K])
def test_guard_allows_every_planned_round_and_no_more(path):
    cfg = load_recipe(path)
    mech = _mechanism(path)
    assert mech.guard is not None
    affordable = mech.guard.rounds_affordable(RunningAccountant(cfg.privacy.accountant), mech.noise_multiplier, mech.q)
    assert affordable == cfg.server.rounds  # a member may not spend its partner's share
    # the pair's budget, were one run to take it alone, would allow about twice the rounds
    pair = BudgetGuard(cfg.privacy.target_epsilon, mech.accounting_delta)
    assert pair.rounds_affordable(RunningAccountant(cfg.privacy.accountant), mech.noise_multiplier, mech.q) >= 2 * cfg.server.rounds
