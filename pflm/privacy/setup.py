"""Builds a recipe's privacy chain (clip → [adaptive] → noise) and accountant, and answers budget questions.

The only place that turns `PrivacyConfig` into objects, so the simulator and the Flower ServerApp apply the
same σ, the same noise cohort and the same accounting. ε always refers to the *noise cohort* M out of the
population N (q = M/N), which the summary states explicitly.
"""

from __future__ import annotations

import math
from typing import Any

from pflm.config import RecipeConfig
from pflm.errors import ConfigError
from pflm.privacy.accountant import PrivacyBudget, RunningAccountant
from pflm.privacy.adaptive import AdaptiveClipping, AdaptiveClippingConfig
from pflm.privacy.base import Postprocessor
from pflm.privacy.budget import BudgetGuard
from pflm.privacy.clipping import L2Clip
from pflm.privacy.noise import GaussianNoisePostprocessor, SecureGaussian, derive_key


class PrivacySetup:
    def __init__(self, cfg: RecipeConfig, train_users: int) -> None:
        p = cfg.privacy
        self.cfg = cfg
        self.population = p.population or train_users
        self.noise_cohort = p.noise_cohort or cfg.server.cohort_size
        if self.noise_cohort > self.population:
            raise ConfigError(
                f"noise cohort {self.noise_cohort} exceeds the population {self.population}; "
                "lower privacy.noise_cohort or raise privacy.population"
            )
        self.q = self.noise_cohort / self.population
        self.delta = p.delta
        sampling = "poisson" if cfg.server.sampling == "poisson" else "fixed"
        if p.target_epsilon is not None:
            self.budget = PrivacyBudget(
                population=self.population, cohort=self.noise_cohort, rounds=cfg.server.rounds, delta=p.delta,
                epsilon=p.target_epsilon, accountant=p.accountant, sampling=sampling,
            )
            self.noise_multiplier = float(self.budget.noise_multiplier)
            self.guard: BudgetGuard | None = BudgetGuard(p.target_epsilon, p.delta)
        else:
            self.noise_multiplier = float(p.noise_multiplier or 0.0)
            self.budget = PrivacyBudget(
                population=self.population, cohort=self.noise_cohort, rounds=cfg.server.rounds, delta=p.delta,
                noise_multiplier=self.noise_multiplier, accountant=p.accountant, sampling=sampling,
            )
            self.guard = None
        key = derive_key(cfg.seed if p.noise_seed == "run_seed" else None)
        self.generator = SecureGaussian(key)
        self.accountant = RunningAccountant(p.accountant)
        self.adaptive: AdaptiveClipping | None = None
        ac = p.adaptive_clipping
        if ac.enabled:
            self.adaptive = AdaptiveClipping(
                AdaptiveClippingConfig(
                    initial_clip_bound=p.clip_bound, noise_multiplier=self.noise_multiplier,
                    target_quantile=ac.target_quantile, learning_rate=ac.learning_rate,
                    count_noise_std=ac.count_noise_std or None, noise_cohort=self.noise_cohort,
                ),
                self.generator,
            )
            clip: Postprocessor = self.adaptive
            update_sigma = self.adaptive.update_noise_multiplier
        else:
            clip = L2Clip()
            update_sigma = self.noise_multiplier
        self.update_noise_multiplier = update_sigma
        self.postprocessors: list[Postprocessor] = [
            clip,
            GaussianNoisePostprocessor(update_sigma, self.generator, noise_cohort=self.noise_cohort),
        ]

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0

    def _round_sigmas(self) -> float | tuple[float, float]:
        if self.adaptive is not None:
            return self.adaptive.accounting_noise_multipliers
        return self.noise_multiplier

    def account_round(self) -> dict[str, float]:
        """Record one release (only called once a round's aggregate was really applied)."""
        if not self.private:
            return {}
        self.accountant.step(self._round_sigmas(), self.q)
        return {"epsilon": self.accountant.epsilon(self.delta)}

    def stop_reason(self, round_idx: int) -> str | None:
        if self.guard is None or not self.private:
            return None
        if self.guard.allows_next_round(self.accountant, self._round_sigmas(), self.q, round_idx + 1):
            return None
        return self.guard.stop_reason

    def epsilon(self) -> float | None:
        if not self.private:
            return None
        eps = self.accountant.epsilon(self.delta) if self.accountant.steps else 0.0
        return None if math.isinf(eps) else eps

    def summary(self) -> dict[str, Any]:
        return {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "update_noise_multiplier": self.update_noise_multiplier,
            "target_epsilon": self.cfg.privacy.target_epsilon,
            "accountant": self.cfg.privacy.accountant,
            "privacy_population": self.population,
            "noise_cohort": self.noise_cohort,
            "sampling_rate": self.q,
            "epsilon_refers_to": (
                f"user-level DP for a population of {self.population} users with cohorts of {self.noise_cohort} "
                f"(q={self.q:g}); {self.budget.sampling_statement}"
                if self.private else "no noise: the model is not differentially private"
            ),
            "final_clip_bound": self.adaptive.clip_bound if self.adaptive else self.cfg.privacy.clip_bound,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "accountant": self.accountant.state_dict(),
            "postprocessors": [pp.state_dict() for pp in self.postprocessors],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        for pp, st in zip(self.postprocessors, state["postprocessors"]):
            pp.load_state_dict(st)
