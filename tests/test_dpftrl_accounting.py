"""DP-FTRL accounting: calibration round-trips, independent noise equals Opacus' composition, CLI support."""

from __future__ import annotations

import json
import math

import pytest
from opacus.accountants import RDPAccountant

from pflm.privacy.accountant import combine_noise_multipliers, epsilon_from_history
from pflm.privacy.dpftrl.accounting import calibrate_dpftrl, count_multiplier, dpftrl_epsilon
from pflm.privacy.dpftrl.strategy import make_strategy


@pytest.mark.parametrize("target,sens", [(1.0, 1.0), (2.0, 6.16), (8.0, 3.3)])
def test_calibration_round_trips(target, sens):
    sigma = calibrate_dpftrl(target, sens, 1e-6)
    eps = dpftrl_epsilon(sigma, sens, 1e-6)
    assert target * (1 - 2e-4) <= eps <= target
    assert dpftrl_epsilon(sigma * 0.99, sens, 1e-6) > target  # not over-noised


def test_independent_noise_is_k_fold_gaussian_composition_in_opacus():
    """Banded MF with one band is DP-FedAvg without amplification: a user in k rounds is k Gaussian releases
    at q = 1 (Opacus RDP composes them), i.e. one Gaussian with multiplier σ/√k (Mironov 2017, Prop. 7)."""
    n, b, k, sigma = 40, 4, 7, 5.0
    s = make_strategy("banded_mf", n, b, k, bands=1)
    assert s.sensitivity() == pytest.approx(math.sqrt(k))
    acc = RDPAccountant()
    for _ in range(k):
        acc.step(noise_multiplier=sigma, sample_rate=1.0)
    assert dpftrl_epsilon(sigma, s.sensitivity(), 1e-6) == pytest.approx(acc.get_epsilon(1e-6), rel=1e-9)


def test_adaptive_counts_and_a_dp_vocabulary_are_composed():
    sens, k, delta = 4.0, 9, 1e-6
    prior = [(3.0, 1.0, 1)]
    cm = count_multiplier(20.0, k)
    assert cm == pytest.approx(2 * 20.0 / 3)
    base = dpftrl_epsilon(10.0, sens, delta)
    both = dpftrl_epsilon(10.0, sens, delta, prefix=prior, count_mult=cm)
    assert both == pytest.approx(epsilon_from_history([*prior, (combine_noise_multipliers([2.5, cm]), 1.0, 1)], delta))
    assert both > base
    sigma = calibrate_dpftrl(3.0, sens, delta, prefix=prior, count_mult=cm)
    assert 3.0 * (1 - 2e-4) <= dpftrl_epsilon(sigma, sens, delta, prefix=prior, count_mult=cm) <= 3.0


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    from pflm import cli

    rc = cli.main(["privacy", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_calibrate_then_epsilon_round_trip(capsys):
    common = ["--mechanism", "dpftrl", "--kind", "tree", "--rounds", "64", "--min-separation", "8", "--delta", "1e-6",
              "--json"]
    rc, out, _ = _cli(capsys, "calibrate", "--epsilon", "2", *common)
    cal = json.loads(out)
    assert rc == 0 and cal["mechanism"] == "dpftrl" and cal["max_participations"] == 8
    rc, out, _ = _cli(capsys, "epsilon", "--noise-multiplier", repr(cal["noise_multiplier"]), *common)
    back = json.loads(out)
    assert back["epsilon"] == pytest.approx(cal["epsilon"]) and back["epsilon"] <= 2.0
    rc, _, err = _cli(capsys, "calibrate", "--epsilon", "2", "--sampling-rate", "0.1", *common)
    assert rc == 2 and "does not apply" in err and len(err.strip().splitlines()) == 1


def test_mechanism_accounts_the_prefix_and_refuses_what_it_cannot_cover():
    from pflm.config import load_recipe
    from pflm.errors import ConfigError, PflmError
    from pflm.privacy.mechanism import build_mechanism
    from pflm.secure_random import new_key

    over = ["privacy.mechanism=dpftrl", "server.sampling=available", "privacy.noise_multiplier=0", "server.rounds=12",
            "privacy.target_epsilon=3", "server.min_separation=3", "privacy.dpftrl.kind=banded_mf",
            "privacy.adaptive_clipping.enabled=true", "privacy.adaptive_clipping.count_noise_std=5", "data.dir=x"]
    mech = build_mechanism(load_recipe("recipes/tiny_synthetic.yaml", over), 100, new_key())
    eps = [mech.account_round()["epsilon"] for _ in range(12)]
    assert eps == sorted(eps) and 3 * (1 - 2e-4) <= eps[-1] <= 3.0  # the prefix ε grows to the calibrated target
    assert mech.summary()["dpftrl"]["max_participations"] == 4 and "adaptive-clipping" in mech.summary()["epsilon_refers_to"]
    with pytest.raises(PflmError, match="same correlated"):
        mech.account_round(releases=2)
    state = mech.state_dict()
    other = build_mechanism(load_recipe("recipes/tiny_synthetic.yaml", [*over, "server.min_separation=2"]), 100, new_key())
    with pytest.raises(ConfigError, match="keep them fixed"):
        other.load_state_dict(state)


def test_cli_plan_for_dpftrl_writes_the_grid(capsys, tmp_path):
    rc, out, _ = _cli(capsys, "plan", "--mechanism", "dpftrl", "--kind", "banded_mf", "--epsilon", "2", "--delta",
                      "1e-6", "--population", "1000", "--cohorts", "50", "100", "--rounds", "40", "--dim", "1000",
                      "--out", str(tmp_path / "p"), "--json")
    rows = json.loads(out)["rows"]
    assert rc == 0 and [r["min_separation"] for r in rows] == [20, 10] and [r["max_participations"] for r in rows] == [2, 4]
    assert all(r["epsilon"] <= 2.0 for r in rows) and (tmp_path / "p" / "plan.csv").exists()
