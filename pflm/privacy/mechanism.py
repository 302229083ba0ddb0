"""The run's DP mechanism (`DPMechanism`): clip → [adaptive] → noise, its accountant, and the budget questions.

The only place that turns `PrivacyConfig` into objects, so the simulator and the Flower ServerApp apply the
same σ, the same noise cohort and the same accounting. ε always refers to the *noise cohort* M out of the
population N (q = M/N) under Poisson sampling, composed with any DP release the data preparation made (a DP
vocabulary: one Gaussian release at q = 1 plus its thresholding δ), and the summary says all of it.
"""

from __future__ import annotations

import math
from typing import Any

from pflm.config import RecipeConfig
from pflm.device.spec import DeviceSpec
from pflm.errors import ConfigError
from pflm.privacy.accountant import PrivacyBudget, RunningAccountant, combine_noise_multipliers, epsilon_from_history
from pflm.privacy.adaptive import AdaptiveClipping
from pflm.privacy.base import Postprocessor
from pflm.privacy.guard import BudgetGuard
from pflm.privacy.clipping import L2Clip
from pflm.privacy.noise import GaussianNoisePostprocessor
from pflm.secure_random import SecureRandom, subkey

REPRODUCIBLE_WARNING = (
    "REPRODUCIBLE MODE: noise, cohorts and device randomness are derived from the public recipe seed; "
    "this ε does NOT hold against anyone who knows the seed (set privacy.reproducible=false)"
)


def data_prior_releases(data_privacy: dict | None) -> tuple[list[tuple[float, float, int]], float]:
    """(accountant history, extra δ) of the DP releases a `pflm prepare` made from the training users."""
    rel = (data_privacy or {}).get("dp_release")
    if not rel:
        return [], 0.0
    try:
        history = [(float(rel["noise_multiplier"]), float(rel.get("sampling_rate", 1.0)), int(rel.get("count", 1)))]
        return history, float(rel.get("threshold_delta", 0.0))
    except (KeyError, TypeError, ValueError):
        raise ConfigError("the data manifest's privacy.dp_release is malformed; re-run `pflm prepare`") from None


def describe_guarantee(out: dict[str, Any], mech: Any, parts: list[str], per_round: str, reproducible: bool) -> None:
    """The part of a central mechanism's summary every mechanism shares: what ε refers to (the mechanism's own
    `parts`, then the DP vocabulary/prior release it is composed with), the noise-cohort note with the simulated
    users' ε, and the reproducibility warning. `per_round` says how the simulated cohort is drawn."""
    if mech.prior_history:
        parts.append(f"composed with the DP vocabulary/prior release (σ={mech.prior_history[0][0]:g}, "
                     f"threshold δ={mech.threshold_delta:g} included in δ)")
    out["epsilon_refers_to"] = "; ".join(parts)
    if mech.noise_cohort != mech.expected_cohort or mech.population != mech.train_users:
        out["simulated_users_epsilon"] = mech.simulated_users_epsilon()
        out["simulated_users_note"] = (
            f"noise-cohort setting: the {mech.train_users} users this simulation trained ({mech.expected_cohort} "
            f"{per_round}) get noise σ·{mech.expected_cohort}/{mech.noise_cohort} on their sum; "
            "simulated_users_epsilon is the ε that holds for them"
        )
    if reproducible:
        out["privacy_warning"] = REPRODUCIBLE_WARNING


def check_data_privacy(cfg: RecipeConfig, data_privacy: dict, data_dir: str) -> None:
    """Refuse a DP run on data whose vocabulary or prior was computed from the training users without DP:
    both are released (the tokenizer file, the output bias, the PEU rows, the NCE noise distribution)."""
    if not cfg.private:
        return
    leaks = [k for k in ("vocabulary", "prior") if data_privacy.get(k, "private") not in ("public", "dp")]
    if leaks:
        raise ConfigError(
            f"{data_dir} has a {' and '.join(leaks)} computed from the training users' private data, which a DP run "
            "would release; re-run `pflm prepare` with --tokenizer-input wordfreq, a public --tokenizer-input FILE, "
            "or --vocab-source dp"
        )


def device_postprocessors(spec: DeviceSpec) -> list[Postprocessor]:
    """The device half of the chain: clipping (reporting the adaptive-clipping bit when that is on). It needs
    neither the server's run key nor a calibrated σ, so a device builds it from its spec alone."""
    return [L2Clip(report_unclipped=spec.report_unclipped)]


class DPMechanism:
    """Everything DP about one run: the postprocessor chain, the secret noise stream, the accountant and guard."""

    def __init__(self, cfg: RecipeConfig, train_users: int, run_key: bytes, data_privacy: dict | None = None,
                 release_dim: int | None = None) -> None:
        p = cfg.privacy
        self.cfg = cfg
        self.train_users = train_users
        self.population = p.population or train_users
        self.expected_cohort = cfg.server.cohort_size
        self.noise_cohort = p.noise_cohort or self.expected_cohort
        if self.noise_cohort > self.population:
            raise ConfigError(
                f"noise cohort {self.noise_cohort} exceeds the population {self.population}; "
                "lower privacy.noise_cohort or raise privacy.population"
            )
        self.q = self.noise_cohort / self.population
        self.delta = p.delta  # the δ we print: accountant δ + the thresholding δ of a DP vocabulary
        self.data_privacy = data_privacy or {}
        self.prior_history, self.threshold_delta = data_prior_releases(data_privacy) if cfg.private else ([], 0.0)
        self.accounting_delta = self.delta - self.threshold_delta
        if self.accounting_delta <= 0:
            raise ConfigError(
                f"privacy.delta={self.delta:g} does not exceed the DP vocabulary's threshold δ={self.threshold_delta:g}; "
                "raise privacy.delta or prepare the data with a smaller --vocab-dp-threshold-delta"
            )
        self.members = p.ensemble_members
        if self.members > 1 and self.prior_history:
            raise ConfigError("privacy.ensemble_members > 1 cannot share a DP vocabulary's budget between runs; "
                              "prepare the data with a public vocabulary or set privacy.ensemble_members=1")
        budget_kw: dict[str, Any] = dict(
            population=self.population, cohort=self.noise_cohort, rounds=cfg.server.rounds * self.members,
            delta=self.accounting_delta, accountant=p.accountant, sampling=cfg.server.sampling,
            prior_releases=tuple(self.prior_history),
        )
        if p.target_epsilon is not None:
            self.budget = PrivacyBudget(epsilon=p.target_epsilon, **budget_kw)
            self.noise_multiplier = float(self.budget.noise_multiplier)
            # one member may spend only its share: the ε of its own planned rounds at the calibrated σ
            share = p.target_epsilon if self.members == 1 else (1 + 1e-9) * epsilon_from_history(
                [(self.noise_multiplier, self.q, cfg.server.rounds)], self.accounting_delta, p.accountant)
            self.guard: BudgetGuard | None = BudgetGuard(share, self.accounting_delta)
        else:
            self.noise_multiplier = float(p.noise_multiplier or 0.0)
            self.budget = PrivacyBudget(noise_multiplier=self.noise_multiplier, **budget_kw)
            self.guard = None
        self.generator = SecureRandom(subkey(run_key, "central-noise"))
        self.accountant = RunningAccountant(p.accountant)
        self.accountant.history = list(self.prior_history)
        self.adaptive: AdaptiveClipping | None = None
        ac = p.adaptive_clipping
        if ac.enabled:
            self.adaptive = AdaptiveClipping(
                ac, p.clip_bound, self.noise_multiplier, self.expected_cohort, self.noise_cohort, self.generator
            )
            clip: Postprocessor = self.adaptive
            update_sigma = self.adaptive.update_noise_multiplier
        else:
            clip = L2Clip()
            update_sigma = self.noise_multiplier
        self.update_noise_multiplier = update_sigma
        self.postprocessors: list[Postprocessor] = [
            clip,
            GaussianNoisePostprocessor(update_sigma, self.generator, self.expected_cohort, self.noise_cohort),
        ]
        self.distributed: Any = None  # distributed DP: devices add the noise (pflm/privacy/distributed/)
        if p.mechanism.startswith("distributed_") and self.noise_multiplier > 0:
            from pflm.privacy.distributed.mechanism import DistributedDP, DistributedNoiseReport

            if release_dim is None:
                raise ConfigError(f"privacy.mechanism={p.mechanism} needs the release dimension to calibrate")
            self.central_noise_multiplier = self.noise_multiplier  # central Gaussian at the same ε (comparison)
            self.distributed = DistributedDP(cfg, release_dim, self.q, self.noise_cohort, self.expected_cohort,
                                             self.accounting_delta, self.prior_history, self.noise_multiplier)
            self.noise_multiplier = self.update_noise_multiplier = self.distributed.params.noise_multiplier
            self.guard = None
            self.postprocessors = [clip, DistributedNoiseReport(self.distributed)]

    @property
    def private(self) -> bool:
        return self.noise_multiplier > 0

    def clip_bound_for(self, round_idx: int) -> float:
        """The L2 bound C devices clip to in round `round_idx`: the only place a round's C is decided (the
        adaptive state after the previous rounds, or the recipe's fixed bound)."""
        return self.adaptive.clip_bound if self.adaptive is not None else float(self.cfg.privacy.clip_bound)

    def _round_sigmas(self) -> float | tuple[float, float]:
        if self.adaptive is not None:
            return self.adaptive.accounting_noise_multipliers
        return self.noise_multiplier

    def account_round(self, releases: int = 1, contributors: int | None = None, cohort: int | None = None
                      ) -> dict[str, float]:
        """Record a round's release(s): only called once its aggregate was really applied. `releases` > 1 when
        a resumed run redid a round that had already been released with a different result (see ledger).
        `contributors` of the `cohort` devices are in the sum (distributed DP charges these survivors' noise)."""
        if not self.private or releases < 1:
            return {}
        if self.distributed is not None:
            return self.distributed.account_round(int(contributors or 0), int(cohort or 0), releases)
        self.accountant.step(self._round_sigmas(), self.q, n=releases)
        return {"epsilon": self.accountant.epsilon(self.accounting_delta)}

    def stop_reason(self, round_idx: int, pending_releases: int = 1) -> str | None:
        """Why round `round_idx` must not run (its release would exceed the target ε), else None.
        `pending_releases` counts the releases the round may be charged (more than one after a resume)."""
        if self.distributed is not None:
            return self.distributed.stop_reason(round_idx, pending_releases)
        if self.guard is None or not self.private:
            return None
        trial = self.accountant
        if pending_releases > 1:  # a redone round: charge its earlier releases on a copy first
            trial = self.accountant.copy()
            trial.step(self._round_sigmas(), self.q, n=pending_releases - 1)
        if self.guard.allows_next_round(trial, self._round_sigmas(), self.q, round_idx + 1):
            return None
        return self.guard.stop_reason

    def epsilon(self) -> float | None:
        if not self.private:
            return None
        if self.distributed is not None:
            eps = self.distributed.epsilon()
            return None if math.isinf(eps) else eps
        eps = self.accountant.epsilon(self.accounting_delta) if self.accountant.steps else 0.0
        return None if math.isinf(eps) else eps

    def simulated_users_epsilon(self) -> float | None:
        """With the noise-cohort option, the ε that holds for the users the simulation really trained: their
        sum gets noise σ·m̄/M (not σ), at rate m̄ / (number of training users)."""
        if not self.private or self.noise_cohort == self.expected_cohort and self.population == self.train_users:
            return self.epsilon()
        if self.distributed is not None:
            return None  # not computed for distributed noise (docs/distributed_dp.md)
        rounds = self.accountant.steps - sum(n for _, _, n in self.prior_history)
        if rounds <= 0:
            return 0.0
        sigma = combine_noise_multipliers(self._round_sigmas()) * self.expected_cohort / self.noise_cohort
        q = min(1.0, self.expected_cohort / self.train_users)
        eps = epsilon_from_history([*self.prior_history, (sigma, q, rounds)], self.accounting_delta, self.cfg.privacy.accountant)
        return None if math.isinf(eps) else eps

    def summary(self) -> dict[str, Any]:
        p = self.cfg.privacy
        private = self.private
        out: dict[str, Any] = {
            "epsilon": self.epsilon(),
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "update_noise_multiplier": self.update_noise_multiplier,
            "target_epsilon": p.target_epsilon,
            "accountant": p.accountant,
            "sampling": self.cfg.server.sampling,
            "privacy_population": self.population,
            "noise_cohort": self.noise_cohort,
            "expected_cohort": self.expected_cohort,
            "sampling_rate": self.q,
            "reproducible": p.reproducible,
            "vocabulary_source": self.data_privacy.get("vocabulary", "private"),
            "prior_source": self.data_privacy.get("prior", "private"),
            "final_clip_bound": self.clip_bound_for(self.cfg.server.rounds),
        }
        if not private:
            out["epsilon_refers_to"] = "no noise: the model is not differentially private"
            return out
        parts = [
            f"user-level (ε, δ)-DP (add/remove one user) for a population of {self.population} users with "
            f"Poisson-sampled cohorts of expected size {self.noise_cohort} (q={self.q:g}), {p.accountant} accountant"
        ]
        describe_guarantee(out, self, parts, "expected per round", p.reproducible)
        if self.distributed is None:  # public (σ, q, releases): lets ensembles compose runs (pflm.evaluation.ensemble)
            out["accountant_history"] = [[float(s), float(q), int(n)] for s, q, n in self.accountant.history]
        else:
            out["mechanism"] = p.mechanism
            out["central_noise_multiplier"] = self.central_noise_multiplier
            out.update(self.distributed.summary())
        if self.members > 1:
            out["ensemble_members"] = self.members
            out["ensemble_epsilon"] = epsilon_from_history(self.accountant.history * self.members,
                                                           self.accounting_delta, p.accountant)
            out["epsilon_refers_to"] += (f"; this run alone: it is one of {self.members} runs released together, "
                                         "whose ensemble is (ensemble_epsilon, δ)-DP")
        return out

    def state_dict(self) -> dict[str, Any]:
        state = {
            "accountant": self.accountant.state_dict(),
            "postprocessors": [pp.state_dict() for pp in self.postprocessors],
        }
        if self.distributed is not None:
            state["distributed"] = self.distributed.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.accountant.load_state_dict(state["accountant"])
        if self.distributed is not None:
            self.distributed.load_state_dict(state.get("distributed", {}))
        for pp, st in zip(self.postprocessors, state["postprocessors"]):
            pp.load_state_dict(st)


def build_mechanism(cfg: RecipeConfig, train_users: int, run_key: bytes, data_privacy: dict | None = None,
                    release_dim: int | None = None):
    """The run's mechanism object for `privacy.mechanism` (gaussian: `DPMechanism`; dpftrl: `DPFTRLMechanism`)."""
    if cfg.privacy.mechanism == "dpftrl":
        from pflm.privacy.dpftrl.mechanism import DPFTRLMechanism  # imports this module: import on use

        return DPFTRLMechanism(cfg, train_users, run_key, data_privacy)
    return DPMechanism(cfg, train_users, run_key, data_privacy, release_dim)
