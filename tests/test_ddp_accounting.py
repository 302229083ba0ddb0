"""Distributed DP accounting: Skellam / DDGauss RDP bounds, Poisson subsampling, calibration, dropouts, CLI."""

from __future__ import annotations

import math
import numpy as np
import pytest
from opacus.accountants.analysis.rdp import compute_rdp

from pflm.errors import ConfigError
from pflm.privacy.accountant import calibrate_noise, compute_epsilon
from pflm.privacy.distributed.accounting import (
    DiscreteRelease, ddgauss_rdp, epsilon, l1_bound, rounded_norm_bound, skellam_rdp, subsampled_rdp,
)
from pflm.privacy.distributed.params import plan_parameters


@pytest.mark.parametrize("sigma,q", [(1.0, 0.01), (0.8, 0.005), (2.0, 0.1)])
def test_zhu_wang_bound_never_below_the_exact_subsampled_gaussian(sigma, q):
    """Zhu & Wang 2019 (Poisson subsampled RDP, general upper bound): applied to the Gaussian's RDP α/(2σ²) it must
    upper-bound Mironov et al.'s exact subsampled-Gaussian RDP (Opacus) at every order — an amplification that is
    too optimistic would dip below it — and stay within a small factor of it (the price of a bound valid for any mechanism)."""
    for a in (2, 3, 5, 8, 16, 32, 64):
        ours = subsampled_rdp(lambda al: al / (2 * sigma * sigma), q, a)
        exact = float(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=[a])[0])
        assert ours >= exact * (1 - 1e-9)
        assert ours <= 3.0 * exact + 1e-12  # measured ≤ 2.2× on this grid


def test_skellam_rdp_is_the_gaussian_plus_a_vanishing_term():
    """Agarwal et al. 2021: Sk(μ, μ) has variance 2μ; its RDP bound is the Gaussian's αΔ²/(2·2μ) plus a term
    O(1/μ²) (or O(Δ₁/μ)), so it is above the Gaussian and converges to it as μ grows."""
    l2, dim = 100.0, 4096
    l1 = l1_bound(l2, dim)
    for z in (0.5, 1.0, 2.0):
        mu = (z * l2) ** 2 / 2
        for a in (2, 10, 50):
            gauss = a / (2 * z * z)
            sk = skellam_rdp(a, l2, l1, mu)
            assert gauss <= sk <= gauss * 1.01
    # at q = 1 the composed ε equals Opacus' Gaussian ε up to that vanishing term
    z, big = 1.0, 1e5
    rel = DiscreteRelease("distributed_skellam", big, l1_bound(big, dim), (z * big) ** 2, 10, dim)
    e_sk = epsilon([(rel, 1.0, 5)], 1e-5)
    e_gauss = compute_epsilon(1.0, z, 5, 1e-5)
    assert e_gauss <= e_sk <= e_gauss * 1.001


def test_ddgauss_one_share_is_the_discrete_gaussian_zcdp():
    """Kairouz et al. 2021 Thm. 1 with n = 1 share has τ = 0: the discrete Gaussian's ½(Δ/σ)²-zCDP
    (Canonne, Kamath, Steinke 2020, Thm. 4), i.e. RDP αΔ²/(2σ²); more shares with σ ≥ 1 keep τ negligible."""
    assert ddgauss_rdp(7, 3.0, 9.0, 4.0, 1, 1000) == pytest.approx(7 * 9 / 8)
    # n shares of variance σ²: the l2 scale uses √n·σ, τ ≈ 10·n·e^{-π²σ²} is ~1e-40 here
    assert ddgauss_rdp(7, 30.0, 900.0, 25.0, 36, 10**6) == pytest.approx(7 * 900 / (2 * 36 * 25), rel=1e-9)
    # tiny shares (σ = 0.3): τ is large and the bound must get worse than the continuous sum's
    assert ddgauss_rdp(7, 30.0, 900.0, 0.09, 36, 10**4) > 7 * 900 / (2 * 36 * 0.09)


def test_rounded_norm_bound_matches_kairouz_theorem():
    """Kairouz et al. 2021 Thm. 1: min(c + √d, √(c² + d/4 + √(2 ln(1/β))(c + √d/2)))."""
    c, d, beta = 1000.0, 10**6, math.exp(-0.5)
    expect = math.sqrt(c * c + d / 4 + math.sqrt(2 * 0.5) * (c + 500.0))
    assert rounded_norm_bound(c, beta, d) == pytest.approx(expect)
    assert rounded_norm_bound(c, 0.0, d) == pytest.approx(c + 1000.0)


def test_calibration_meets_the_target_and_bits_trade_off():
    """σ is calibrated so ε ≤ target; fewer bits → coarser grid → larger rounding inflation and noise gap."""
    kw = dict(devices=1000, dropout_tolerance=0.05, clip_bound=1.0, dim=1 << 16, q=0.01, rounds=100, delta=1e-6,
              target_epsilon=4.0)
    p16 = plan_parameters("distributed_skellam", 16, **kw)
    p10 = plan_parameters("distributed_skellam", 10, **kw)
    assert epsilon([(p16.release(), 0.01, 100)], 1e-6) <= 4.0
    assert epsilon([(p16.release(), 0.01, 100)], 1e-6) >= 4.0 * 0.99
    assert p10.rounding_inflation > p16.rounding_inflation > 1.0
    central = calibrate_noise(0.01, 100, 1e-6, 4.0)
    assert p16.noise_multiplier >= central  # a looser (general) amplification bound can only cost noise
    assert p16.sum_std() / central > 1.0


def test_dropouts_change_the_charged_noise():
    """Each round charges the survivors' shares: fewer survivors than the tolerated minimum → larger ε; more
    survivors are charged as the minimum (extra independent noise is post-processing)."""
    p = plan_parameters("distributed_dgauss", 16, 200, 0.1, 1.0, 1 << 12, 0.02, 50, 1e-6, target_epsilon=3.0)
    assert p.min_survivors == 180
    full = epsilon([(p.release(), 0.02, 50)], 1e-6)
    assert epsilon([(p.release(200), 0.02, 50)], 1e-6) == full
    dropped = epsilon([(p.release(120), 0.02, 50)], 1e-6)
    assert dropped > full * 1.3
    with pytest.raises(ConfigError):
        p.release(0)


def test_cli_calibrate_and_plan(tmp_path, capsys, monkeypatch):
    from pflm import cli

    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ["pflm.privacy.cli"])
    so = ["--epsilon", "2", "--delta", "1e-6", "--population", "1000000", "--cohort", "5000", "--rounds", "200"]
    assert cli.main(["privacy", "calibrate", *so, "--mechanism", "distributed_skellam", "--bits", "18", "--dim",
                     "100000", "--clip-bound", "0.3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("noise_multiplier: ") and float(out[0].split()[1]) > 0.8
    assert any(line.startswith("bits_per_coordinate: 18") for line in out)
    assert any(line.startswith("noise_gap_to_central: ") for line in out)
    node = [float(line.split()[1]) for line in out if line.startswith("node_noise_multiplier: ")]
    assert len(node) == 1 and 0.4 * float(out[0].split()[1]) < node[0] < float(out[0].split()[1])  # h < n_min
    assert cli.main(["privacy", "plan", "--epsilon", "2", "--delta", "1e-6", "--population", "1000000", "--cohorts",
                     "5000", "--rounds", "200", "--dim", "100000", "--mechanism", "distributed_dgauss", "--bits", "12",
                     "18", "--out", str(tmp_path / "p")]) == 0
    assert "wrap/coord" in capsys.readouterr().out and (tmp_path / "p" / "plan.csv").exists()
    assert cli.main(["privacy", "calibrate", *so, "--mechanism", "distributed_skellam"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--dim" in err


def test_accountant_state_survives_a_resume_and_bits_must_fit_the_secure_sum():
    """The charged history is checkpointed: a restored accountant gives the same ε (a resume cannot reset it)."""
    from pflm.config import load_recipe
    from pflm.privacy.distributed.mechanism import DistributedDP

    over = ["privacy.mechanism=distributed_skellam", "aggregation.kind=secure", "privacy.noise_multiplier=1.0",
            "server.rounds=20", "server.cohort_size=10", "privacy.distributed.bits=16"]
    cfg = load_recipe("recipes/tiny_synthetic.yaml", over)
    ddp = DistributedDP(cfg, 4096, 0.01, 10, 10, 1e-6, [], noise_multiplier=1.0)
    ddp.account_round(survivors=10, cohort=10)
    ddp.account_round(survivors=6, cohort=10)  # 40% dropped: fewer shares than the tolerated minimum
    assert [r.shares for r, _, _ in ddp.history] == [9, 6]
    again = DistributedDP(cfg, 4096, 0.01, 10, 10, 1e-6, [], noise_multiplier=1.0)
    again.load_state_dict(ddp.state_dict())
    assert again.epsilon() == ddp.epsilon() > 0
    small = load_recipe("recipes/tiny_synthetic.yaml", over[:-1] + ["privacy.distributed.bits=40"])
    with pytest.raises(ConfigError, match="aggregation.secagg.bits"):
        DistributedDP(small, 4096, 0.01, 10, 10, 1e-6, [], noise_multiplier=1.0)
