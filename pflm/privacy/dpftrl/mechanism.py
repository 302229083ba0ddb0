"""`DPFTRLMechanism`: the run's DP chain for `privacy.mechanism: dpftrl` (clip → [adaptive] → correlated noise).

Same interface as `pflm.privacy.mechanism.DPMechanism` (the server cannot tell them apart): clip bound per round,
postprocessors, accounting, budget check, summary, state. ε refers to a deployment where each round's cohort
(noise cohort M) is whoever is available, each user joins at most k rounds at least b apart, and NOTHING about
the cohort is secret: no amplification by sampling is assumed (accounting.py).
"""

from __future__ import annotations

import math
from typing import Any

from pflm.config import RecipeConfig
from pflm.errors import ConfigError, PflmError
from pflm.privacy.accountant import epsilon_from_history
from pflm.privacy.adaptive import AdaptiveClipping
from pflm.privacy.base import Postprocessor
from pflm.privacy.clipping import L2Clip
from pflm.privacy.dpftrl.accounting import calibrate_dpftrl, count_multiplier, dpftrl_epsilon
from pflm.privacy.dpftrl.noise import CorrelatedNoisePostprocessor
from pflm.privacy.dpftrl.strategy import Strategy, make_strategy, max_participations
from pflm.privacy.mechanism import data_prior_releases, describe_guarantee
from pflm.secure_random import SecureRandom, subkey


def strategy_for(cfg: RecipeConfig) -> Strategy:
    """The recipe's strategy: n = server.rounds, b = server.min_separation, k = server.max_participations."""
    d, s = cfg.privacy.dpftrl, cfg.server
    return make_strategy(d.kind, s.rounds, s.min_separation, s.max_participations, d.buffers, d.bands)


class DPFTRLMechanism:
    """Everything DP about one DP-FTRL run."""

    def __init__(self, cfg: RecipeConfig, train_users: int, run_key: bytes, data_privacy: dict | None = None) -> None:
        p = cfg.privacy
        self.cfg = cfg
        self.train_users = train_users
        self.population = p.population or train_users
        self.expected_cohort = cfg.server.cohort_size
        self.noise_cohort = p.noise_cohort or self.expected_cohort
        self.delta = p.delta
        self.data_privacy = data_privacy or {}
        self.prior_history, self.threshold_delta = data_prior_releases(data_privacy) if cfg.private else ([], 0.0)
        self.accounting_delta = self.delta - self.threshold_delta
        if self.accounting_delta <= 0:
            raise ConfigError(f"privacy.delta={self.delta:g} does not exceed the DP vocabulary's threshold δ="
                              f"{self.threshold_delta:g}; raise privacy.delta")
        self.strategy = strategy_for(cfg)
        self.k = self.strategy.k
        self.sensitivity = self.strategy.sensitivity()
        self.generator = SecureRandom(subkey(run_key, "central-noise"))
        ac = p.adaptive_clipping
        self.count_noise_std: float | None = None
        if ac.enabled:
            self.count_noise_std = float(ac.count_noise_std or self.noise_cohort / 20.0)
        cm = count_multiplier(self.count_noise_std, self.k)
        if p.target_epsilon is not None:
            self.noise_multiplier = calibrate_dpftrl(p.target_epsilon, self.sensitivity, self.accounting_delta,
                                                     p.accountant, self.prior_history, cm)
        else:
            self.noise_multiplier = float(p.noise_multiplier or 0.0)
        self.update_noise_multiplier = self.noise_multiplier
        self.adaptive: AdaptiveClipping | None = None
        clip: Postprocessor = L2Clip()
        if ac.enabled and self.private:
            # the adaptive step only releases the noisy count and moves C; its σ_b is accounted here
            self.adaptive = AdaptiveClipping(ac, p.clip_bound, 0.0, self.expected_cohort, self.noise_cohort,
                                             self.generator)
            self.adaptive.count_noise_std = self.count_noise_std  # type: ignore[assignment]
            clip = self.adaptive
        self.noise = CorrelatedNoisePostprocessor(self.strategy, self.noise_multiplier, self.generator,
                                                  self.expected_cohort, self.noise_cohort)
        self.postprocessors: list[Postprocessor] = [clip, self.noise]
        self.rounds_accounted = 0

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0

    def clip_bound_for(self, round_idx: int) -> float:
        return self.adaptive.clip_bound if self.adaptive is not None else float(self.cfg.privacy.clip_bound)

    def epsilon_after(self, rounds: int) -> float:
        """ε once the first `rounds` rounds are released (the prefix of the strategy)."""
        if not self.private:
            return math.inf
        if rounds <= 0:
            return epsilon_from_history(self.prior_history, self.accounting_delta, self.cfg.privacy.accountant)
        s = self.strategy
        cm = count_multiplier(self.count_noise_std, max_participations(rounds, s.min_separation, s.k))
        return dpftrl_epsilon(self.noise_multiplier, s.sensitivity(rounds), self.accounting_delta,
                              self.cfg.privacy.accountant, self.prior_history, cm)

    def account_round(self, releases: int = 1) -> dict[str, float]:
        if not self.private or releases < 1:
            return {}
        if releases > 1:
            raise PflmError(
                "a resumed DP-FTRL round released a different aggregate than before under the same correlated "
                "noise, which the accounting cannot cover; start a new run (new name=...)"
            )
        self.rounds_accounted += 1
        return {"epsilon": self.epsilon_after(self.rounds_accounted)}

    def stop_reason(self, round_idx: int, pending_releases: int = 1) -> str | None:
        """Budget check before a round: the calibrated σ covers all n rounds, so only a mis-set σ stops early."""
        target = self.cfg.privacy.target_epsilon
        if target is None or not self.private:
            return None
        eps = self.epsilon_after(round_idx + 1)
        if eps <= target:
            return None
        return f"stopping before round {round_idx}: its release would raise ε to {eps:.4g} > target {target:g}"

    def epsilon(self) -> float | None:
        if not self.private:
            return None
        eps = self.epsilon_after(self.rounds_accounted)
        return None if math.isinf(eps) else eps

    def simulated_users_epsilon(self) -> float | None:
        """With the noise-cohort option the simulated users' sum gets σ·m̄/M: their ε (same (k, b) limits)."""
        if not self.private:
            return None
        if self.rounds_accounted == 0:
            return 0.0
        s = self.strategy
        ratio = self.expected_cohort / self.noise_cohort
        cm = count_multiplier(None if self.count_noise_std is None else self.count_noise_std * ratio,
                              max_participations(self.rounds_accounted, s.min_separation, s.k))
        eps = dpftrl_epsilon(self.noise_multiplier * ratio, s.sensitivity(self.rounds_accounted),
                             self.accounting_delta, self.cfg.privacy.accountant, self.prior_history, cm)
        return None if math.isinf(eps) else eps

    def summary(self) -> dict[str, Any]:
        p, s = self.cfg.privacy, self.strategy
        out: dict[str, Any] = {
            "epsilon": self.epsilon(), "delta": self.delta, "noise_multiplier": self.noise_multiplier,
            "update_noise_multiplier": self.noise_multiplier, "target_epsilon": p.target_epsilon,
            "accountant": p.accountant, "mechanism": "dpftrl", "sampling": self.cfg.server.sampling,
            "privacy_population": self.population, "noise_cohort": self.noise_cohort,
            "expected_cohort": self.expected_cohort, "sampling_rate": None, "reproducible": p.reproducible,
            "vocabulary_source": self.data_privacy.get("vocabulary", "private"),
            "prior_source": self.data_privacy.get("prior", "private"),
            "final_clip_bound": self.clip_bound_for(self.cfg.server.rounds),
            "dpftrl": {**s.describe(), "sensitivity": self.sensitivity, "max_error_squared": s.max_error_squared(),
                       "effective_noise_multiplier": self.noise_multiplier / self.sensitivity,
                       "count_noise_std": self.count_noise_std},
        }
        if not self.private:
            out["epsilon_refers_to"] = "no noise: the model is not differentially private"
            return out
        parts = [
            f"user-level (ε, δ)-DP (add/remove one user) for DP-FTRL ({s.kind}) over {s.n} rounds, each user in at "
            f"most {s.k} rounds at least {s.min_separation} apart (enforced by cohort selection), cohorts of "
            f"{self.noise_cohort} available users; NO amplification by sampling assumed, {p.accountant} accountant"
        ]
        if self.count_noise_std is not None:
            parts.append(f"composed with the adaptive-clipping counts (σ_b={self.count_noise_std:g} per round)")
        describe_guarantee(out, self, parts, "per round", p.reproducible)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"rounds_accounted": self.rounds_accounted, "strategy": self.strategy.describe(),
                "noise_multiplier": self.noise_multiplier,
                "postprocessors": [pp.state_dict() for pp in self.postprocessors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("strategy") != self.strategy.describe() or state.get("noise_multiplier") != self.noise_multiplier:
            raise ConfigError("the checkpoint's DP-FTRL strategy or σ differs from this recipe's (server.rounds, "
                              "min_separation, max_participations or privacy.dpftrl changed); keep them fixed to resume")
        self.rounds_accounted = int(state["rounds_accounted"])
        for pp, st in zip(self.postprocessors, state["postprocessors"]):
            pp.load_state_dict(st)
