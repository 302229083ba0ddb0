"""User-level (ε, δ) accounting for private federated rounds, on top of Opacus' RDP and PRV accountants.

One *release* is one round: the server publishes the noisy sum of the clipped updates of a cohort drawn
with rate q = cohort / population (each user is one "sample", so the guarantee is user-level).

Sampling assumption. Opacus' accountants (and dp-accounting's PLD) analyse **Poisson** subsampling:
every user joins a round independently with probability q. Simulations that draw cohorts of exactly
`cohort` users (fixed-size, without replacement) are accounted with q = cohort / population, the standard
approximation used by pfl-research and most FL papers; it is not a proven bound for fixed-size sampling
under add/remove adjacency. Every output built from `PrivacyBudget.sampling_statement` says which case
applies.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

from pflm.epsilon import (  # noqa: F401 - ACCOUNTANTS, epsilon_from_history, pld_available: re-exported API
    ACCOUNTANTS, _check_delta, _check_rate, check_accountant, epsilon_from_history, pld_available,
)
from pflm.errors import ConfigError

SAMPLINGS = ("poisson", "fixed")
CALIBRATION_RTOL = 1e-4  # calibrated σ gives target·(1 − 1e-4) ≤ ε(σ) ≤ target (or σ bracketed to 1e-9)
MAX_SIGMA = 1e4
History = list[tuple[float, float, int]]  # (noise multiplier, sampling rate, number of releases)


def combine_noise_multipliers(noise_multipliers: float | Sequence[float]) -> float:
    """Effective noise multiplier of several Gaussian releases computed on the *same* sampled cohort.

    Releasing f_i(cohort) + N(0, (σ_i·s_i)²) for queries with per-user L2 sensitivity s_i is the same
    mechanism as one Gaussian release of the stacked query (f_i / (σ_i·s_i))_i with unit noise, whose
    sensitivity is (Σ σ_i⁻²)^½; so it is exactly a subsampled Gaussian with σ = (Σ σ_i⁻²)^(−½). This is
    tighter than composing the releases as if independently sampled, and valid for every accountant.
    Any σ_i = 0 (a release without noise) gives σ = 0, i.e. no privacy.
    """
    if isinstance(noise_multipliers, (int, float)):
        sigmas = [float(noise_multipliers)]
    else:
        sigmas = [float(s) for s in noise_multipliers]
    if not sigmas:
        raise ConfigError("no noise multiplier given: pass at least one σ ≥ 0")
    for s in sigmas:
        if not s >= 0 or math.isinf(s):
            raise ConfigError(f"noise multiplier {s} is invalid: use a finite value ≥ 0")
    if len(sigmas) == 1:
        return sigmas[0]
    if any(s == 0 for s in sigmas):
        return 0.0
    return sum(s**-2 for s in sigmas) ** -0.5


def compute_epsilon(
    q: float, sigma: float, steps: int, delta: float, accountant: str = "rdp", prefix: Sequence[tuple] = ()
) -> float:
    """ε of `steps` releases of a Poisson-subsampled Gaussian with rate q and noise multiplier σ, composed
    after the releases in `prefix` ((σ, q, count) runs, e.g. a DP vocabulary released before training)."""
    if int(steps) < 0:
        raise ConfigError(f"steps={steps} is negative: use a count ≥ 0")
    combine_noise_multipliers(sigma)  # validates
    return epsilon_from_history([*prefix, (float(sigma), q, int(steps))], delta, accountant)


def calibrate_noise(
    q: float, steps: int, delta: float, target_epsilon: float, accountant: str = "rdp", prefix: Sequence[tuple] = ()
) -> float:
    """Smallest σ (to a relative ε tolerance of 1e-4) with ε(prefix + (q, σ, steps), δ) ≤ target_epsilon.

    Bracket by doubling, then bisect on σ keeping the invariant ε(σ_hi) ≤ target < ε(σ_lo); returns σ_hi,
    so the achieved ε never exceeds the target.
    """
    target = float(target_epsilon)
    if not target > 0 or math.isinf(target):
        raise ConfigError(f"target epsilon {target_epsilon} is invalid: use a finite ε > 0")
    if int(steps) < 1:
        raise ConfigError(f"rounds={steps} is invalid: use at least 1 round")
    q = _check_rate(q)
    if q == 0:
        return 0.0

    def eps(s: float) -> float:
        with warnings.catch_warnings():  # probes far from the answer hit the ends of Opacus' order grid
            warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
            return compute_epsilon(q, s, steps, delta, accountant, prefix)

    if prefix and epsilon_from_history(prefix, delta, accountant) >= target:
        raise ConfigError(
            f"the releases made before training already spend ε ≥ {target:g}: raise the target ε or add more "
            "noise to the earlier release (e.g. the DP vocabulary's --vocab-dp-sigma)"
        )
    hi = 1.0
    e_hi = eps(hi)
    while e_hi > target:
        hi *= 2
        if hi > MAX_SIGMA:
            raise ConfigError(
                f"ε={target:g} is unreachable below σ={MAX_SIGMA:g}: "
                "raise ε or δ, or use fewer rounds / a smaller cohort"
            )
        e_hi = eps(hi)
    lo = hi / 2
    while eps(lo) <= target:
        hi, lo = lo, lo / 2
        if hi < 1e-6:
            return hi
    e_hi = eps(hi)
    for _ in range(200):
        if target - e_hi <= CALIBRATION_RTOL * target or hi - lo <= 1e-9 * hi:
            break
        mid = 0.5 * (lo + hi)
        e_mid = eps(mid)
        if e_mid <= target:
            hi, e_hi = mid, e_mid
        else:
            lo = mid
    return hi


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise ConfigError(f"{name}={value!r} is not a whole number: give an integer")
    return int(value)


@dataclass
class PrivacyBudget:
    """A user-level (ε, δ) budget for `rounds` releases with cohorts of `cohort` out of `population` users.

    `cohort` is the *noise cohort*: the cohort size the noise is calibrated for and the ε refers to (with the
    noise-cohort option a simulation may train on fewer users per round but adds noise scaled as if `cohort`
    users took part). Give exactly one of `noise_multiplier` (σ; ε is computed) or `epsilon` (σ is calibrated
    so that ε(σ) ≤ ε within 1e-4 relative); afterwards both are set, `epsilon` holding the achieved ε and
    `target_epsilon` the requested one (None when σ was given). Sampling "poisson" is what the accountants
    analyse; "fixed" (exactly `cohort` users per round) is accounted with q = cohort/population as an
    approximation.
    """

    population: int
    cohort: int
    rounds: int
    delta: float
    noise_multiplier: float | None = None
    epsilon: float | None = None
    accountant: str = "rdp"
    sampling: str = "poisson"
    prior_releases: tuple = ()  # (σ, q, count) releases composed before the rounds (e.g. a DP vocabulary)

    def __post_init__(self) -> None:
        self.prior_releases = tuple((float(s), _check_rate(q), int(n)) for s, q, n in self.prior_releases)
        self.population = _as_int("population", self.population)
        self.cohort = _as_int("cohort", self.cohort)
        self.rounds = _as_int("rounds", self.rounds)
        if self.population < 1:
            raise ConfigError(f"population={self.population} is invalid: use at least 1 user")
        if self.cohort < 1:
            raise ConfigError(f"cohort={self.cohort} is invalid: use at least 1 user per round")
        if self.cohort > self.population:
            raise ConfigError(
                f"cohort {self.cohort} > population {self.population} (q={self.cohort / self.population:g} > 1): "
                "lower the cohort or raise the population"
            )
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds} is invalid: use at least 1 round")
        self.delta = _check_delta(self.delta)
        check_accountant(self.accountant)
        if self.sampling not in SAMPLINGS:
            raise ConfigError(f"unknown sampling {self.sampling!r}: use 'poisson' or 'fixed'")
        if (self.noise_multiplier is None) == (self.epsilon is None):
            raise ConfigError("give exactly one of noise_multiplier and epsilon (the other is derived)")
        if self.epsilon is not None:
            eps = float(self.epsilon)
            if not eps > 0 or math.isinf(eps):
                raise ConfigError(f"epsilon={self.epsilon} is invalid: use a finite ε > 0")
            self.epsilon = eps
            self.noise_multiplier = calibrate_noise(
                self.sampling_rate, self.rounds, self.delta, eps, self.accountant, self.prior_releases
            )
            self.target_epsilon: float | None = eps
            self.epsilon = compute_epsilon(
                self.sampling_rate, self.noise_multiplier, self.rounds, self.delta, self.accountant,
                self.prior_releases,
            )
        else:
            sigma = float(self.noise_multiplier)  # type: ignore[arg-type]
            if not sigma >= 0 or math.isinf(sigma):
                raise ConfigError(f"noise_multiplier={self.noise_multiplier} is invalid: use a finite σ ≥ 0")
            self.noise_multiplier = sigma
            self.target_epsilon = None
            self.epsilon = compute_epsilon(
                self.sampling_rate, sigma, self.rounds, self.delta, self.accountant, self.prior_releases
            )

    @property
    def sampling_rate(self) -> float:
        return self.cohort / self.population

    @property
    def sampling_statement(self) -> str:
        if self.sampling == "poisson":
            return f"Poisson sampling with q={self.sampling_rate:g} (what the {self.accountant} accountant analyses)"
        return (
            f"fixed-size cohorts of {self.cohort} accounted as Poisson sampling with q=cohort/population="
            f"{self.sampling_rate:g} (standard approximation, not a proven bound)"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly description (ε = inf becomes None) for summary files and `--json` output."""
        eps = self.epsilon
        return {
            "epsilon": None if eps is None or math.isinf(eps) else eps,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "population": self.population,
            "noise_cohort": self.cohort,
            "sampling_rate": self.sampling_rate,
            "rounds": self.rounds,
            "accountant": self.accountant,
            "sampling": self.sampling,
            "sampling_statement": self.sampling_statement,
        }


class RunningAccountant:
    """Tracks the releases of a training run and answers ε so far / ε after one more release.

    `step(σ, q)` records one round; σ may be a list of noise multipliers for several Gaussian releases on
    the same cohort (e.g. the update noise σ_Δ and the adaptive-clipping count noise 2σ_b), which are
    combined exactly into one mechanism by `combine_noise_multipliers`. Releases with different (σ, q)
    over time are composed by the accountant itself (RDP curves summed; PRV `compose_heterogeneous`;
    PLD composition). The history is run-length encoded, JSON-serialisable and restored bit-exactly, so a
    resumed run continues from the exact spent budget.
    """

    VERSION = 1

    def __init__(self, accountant: str = "rdp") -> None:
        self.accountant = check_accountant(accountant)
        self.history: History = []
        self._cache: dict[tuple, float] = {}

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    @staticmethod
    def _extended(history: History, sigma: float, q: float, n: int) -> History:
        out = list(history)
        if out and out[-1][0] == sigma and out[-1][1] == q:
            out[-1] = (sigma, q, out[-1][2] + n)
        else:
            out.append((sigma, q, n))
        return out

    def _eps(self, history: History, delta: float) -> float:
        key = (tuple(history), float(delta))
        if key not in self._cache:
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = epsilon_from_history(history, delta, self.accountant)
        return self._cache[key]

    def step(self, noise_multiplier: float | Sequence[float], sampling_rate: float, n: int = 1) -> None:
        """Record `n` releases, each with noise multiplier(s) σ on a cohort sampled at rate q."""
        sigma = combine_noise_multipliers(noise_multiplier)
        q = _check_rate(sampling_rate)
        if int(n) < 1:
            raise ConfigError(f"n={n} is invalid: record at least one release")
        self.history = self._extended(self.history, sigma, q, int(n))

    def epsilon(self, delta: float) -> float:
        return self._eps(self.history, delta)

    def epsilon_if_step(self, noise_multiplier: float | Sequence[float], sampling_rate: float, delta: float) -> float:
        """ε after one more release with these parameters (the history is not changed)."""
        sigma = combine_noise_multipliers(noise_multiplier)
        return self._eps(self._extended(self.history, sigma, _check_rate(sampling_rate), 1), delta)

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": self.VERSION,
            "accountant": self.accountant,
            "history": [[s, q, n] for s, q, n in self.history],
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or "history" not in state or "accountant" not in state:
            raise ConfigError("accountant state is missing 'history'/'accountant': the checkpoint is corrupt")
        if state["accountant"] != self.accountant:
            raise ConfigError(
                f"checkpoint was accounted with {state['accountant']!r}, this run uses {self.accountant!r}: "
                "keep the accountant fixed across a resume"
            )
        history: History = []
        for entry in state["history"]:
            s, q, n = entry
            history.append((float(s), _check_rate(q), int(n)))
        if "steps" in state and sum(n for _, _, n in history) != int(state["steps"]):
            raise ConfigError("accountant state is inconsistent (step count mismatch): the checkpoint is corrupt")
        self.history = history
        self._cache.clear()

    def copy(self) -> "RunningAccountant":
        return copy.deepcopy(self)
