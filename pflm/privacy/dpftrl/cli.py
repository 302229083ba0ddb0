"""`pflm privacy epsilon|calibrate|plan --mechanism dpftrl`: σ ↔ ε for a DP-FTRL strategy under (k, b) limits."""

from __future__ import annotations

import argparse
import math
from typing import Any

from pflm.errors import ConfigError
from pflm.privacy.dpftrl.accounting import calibrate_dpftrl, dpftrl_epsilon
from pflm.privacy.dpftrl.strategy import KINDS, Strategy, make_strategy


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DP-FTRL (--mechanism dpftrl): no sampling amplification, (k, b) participation")
    g.add_argument("--mechanism", choices=("gaussian", "dpftrl"), default="gaussian",
                   help="gaussian (Poisson-sampled DP-FedAvg, default) or dpftrl (correlated noise)")
    g.add_argument("--kind", choices=KINDS, default="blt", help="DP-FTRL strategy (default blt)")
    g.add_argument("--buffers", type=int, default=4, help="BLT buffers (default 4)")
    g.add_argument("--bands", type=int, default=0, help="banded_mf bands (0 = min separation; 1 = independent noise)")
    g.add_argument("--min-separation", type=int, default=0,
                   help="b: rounds between two participations of a user (0 = population // cohort)")
    g.add_argument("--max-participations", type=int, default=0, help="k (0 = as many as b allows)")


def strategy(args: argparse.Namespace, rounds: int, cohort: int | None = None) -> Strategy:
    b = args.min_separation
    if b <= 0:
        if not cohort or not args.population:
            raise ConfigError("give --min-separation, or --cohort and --population (b = population // cohort)")
        b = max(1, args.population // cohort)
    return make_strategy(args.kind, rounds, b, args.max_participations, args.buffers, args.bands)


def solve(args: argparse.Namespace, sigma: float | None = None, epsilon: float | None = None) -> dict[str, Any]:
    """ε for σ or σ for ε, in the same keys as the Gaussian report plus the strategy's numbers."""
    if getattr(args, "sampling_rate", None) is not None:
        raise ConfigError("--sampling-rate does not apply to --mechanism dpftrl (no sampling is assumed)")
    if args.rounds < 1:
        raise ConfigError(f"--rounds {args.rounds} is invalid: use at least 1 round")
    if not 0 < args.delta < 1:
        raise ConfigError(f"--delta {args.delta:g} is invalid: use 0 < δ < 1")
    s = strategy(args, args.rounds, args.cohort)
    sens = s.sensitivity()
    if epsilon is not None:
        sigma = calibrate_dpftrl(epsilon, sens, args.delta, args.accountant)
    assert sigma is not None
    eps = dpftrl_epsilon(sigma, sens, args.delta, args.accountant)
    return {
        "epsilon": None if math.isinf(eps) else eps, "target_epsilon": epsilon, "delta": args.delta,
        "noise_multiplier": sigma, "population": args.population, "noise_cohort": args.cohort, "sampling_rate": None,
        "rounds": args.rounds, "accountant": args.accountant, "sampling": "none (DP-FTRL)", "mechanism": "dpftrl",
        "kind": s.kind, "min_separation": s.min_separation, "max_participations": s.k, "sensitivity": sens,
        "effective_noise_multiplier": sigma / sens, "max_error_squared": s.max_error_squared(),
        "sampling_statement": (
            f"no amplification: DP-FTRL {s.kind} over {s.n} rounds, each user in ≤ {s.k} rounds ≥ {s.min_separation} "
            f"apart; strategy sensitivity {sens:.6g}, so one Gaussian release with multiplier σ/sens = {sigma / sens:.6g}"
        ),
    }


def plan_row(args: argparse.Namespace, cohort: int, rounds: int) -> dict[str, Any]:
    """One `plan` row: σ for the target ε and the noise on the model (prefix sum) after the worst round."""
    s = strategy(args, rounds, cohort)
    sens = s.sensitivity()
    sigma = calibrate_dpftrl(args.epsilon, sens, args.delta, args.accountant)
    std_mean = sigma * args.clip_bound / cohort
    prefix_std = std_mean * math.sqrt(s.max_error_squared())
    return {
        "cohort": cohort, "rounds": rounds, "sampling_rate": None, "noise_multiplier": sigma,
        "epsilon": dpftrl_epsilon(sigma, sens, args.delta, args.accountant), "noise_std_mean": std_mean,
        "noise_norm_mean": std_mean * math.sqrt(args.dim),
        "snr_upper_bound": args.clip_bound / (std_mean * math.sqrt(args.dim)),
        "min_separation": s.min_separation, "max_participations": s.k, "sensitivity": sens,
        "prefix_noise_std_mean": prefix_std,
    }
