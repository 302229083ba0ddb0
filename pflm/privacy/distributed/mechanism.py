"""`DistributedDP`: the run's distributed-DP parameters, its device codec factory and the accountant of what ran.

Deployment vs simulation. As with central DP's noise cohort, ε refers to a deployment of M devices per round
(`privacy.noise_cohort`, default the cohort) out of the population N, with b = `privacy.distributed.bits` bits per
coordinate: `params` (γ, Δ₂, noise shares) are computed for it. A simulation that trains m̄ < M devices gives each
simulated device a noise share such that, when the same fraction of devices survives, the averaged update's noise
equals the deployment's, and scales the integer grid so rounding error and wrap-around relative to the noise are
the deployment's too: the sim's modulus is b − ½·log2(M/m̄) bits (rounded up) and γ_sim ≈ γ·√(M/m̄). With M = m̄
the simulated devices ARE the deployment (same γ, shares, modulus).

Shares are split over the realised cohort n of the round (known to every device of the SecAgg session), so the
noise total does not depend on the Poisson draw: V/(1 − tolerance) when all n survive. Accounting: each round
charges the noise of the devices that really contributed (the survivors of SecAgg), as ⌊survivors·M/n⌋
deployment shares, capped at n_min = ⌊(1 − dropout_tolerance)·M⌋: extra shares are post-processing, so charging
n_min when more survived is valid, and the charged value is then the same public number every round (a smaller
one, only when more than the tolerated fraction dropped, depends on the realised counts).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from pflm.config import RecipeConfig
from pflm.errors import ConfigError
from pflm.privacy.base import Postprocessor
from pflm.privacy.distributed.accounting import DiscreteRelease, epsilon
from pflm.privacy.distributed.codec import CodecScale, DistributedDPCodec, codec_for_round, modulus_bits
from pflm.privacy.distributed.params import DDPParameters, plan_parameters, scale_for
from pflm.privacy.distributed.rotation import padded_length, rotation_seed
from pflm.privacy.distributed.accounting import l1_bound, rounded_norm_bound  # noqa: F401 (re-exported)
from pflm.round import AggregateResult, RoundContext


class DistributedNoiseReport(Postprocessor):
    """Server side of distributed DP: adds NO noise (it is already in the secure sum); reports the public stds."""

    def __init__(self, ddp: DistributedDP) -> None:
        self.ddp = ddp

    def on_server(self, agg: AggregateResult, ctx: RoundContext) -> tuple[AggregateResult, dict[str, float]]:
        std = self.ddp.sim_noise_std_sum()
        m = self.ddp.expected_cohort
        return agg, {"noise_std_sum": std, "noise_std_mean": std / m,
                     "noise_norm_mean": std / m * math.sqrt(agg.total.numel())}


class DistributedDP:
    """Parameters, codec factory and discrete accountant of one run's distributed DP."""

    def __init__(self, cfg: RecipeConfig, dim: int, q: float, noise_cohort: int, expected_cohort: int,
                 delta: float, prior_history: list, noise_multiplier: float | None = None) -> None:
        p, d = cfg.privacy, cfg.privacy.distributed
        self.cfg, self.q, self.delta, self.prior = cfg, q, delta, [tuple(h) for h in prior_history]
        self.noise_cohort, self.expected_cohort = int(noise_cohort), int(expected_cohort)
        self.dim = int(dim)
        self.padded, _ = padded_length(self.dim, d.rotation_block)
        self.params: DDPParameters = plan_parameters(
            p.mechanism, d.bits, self.noise_cohort, d.dropout_tolerance, p.clip_bound, self.padded, q,
            cfg.server.rounds, delta, target_epsilon=p.target_epsilon,
            noise_multiplier=None if p.target_epsilon is not None else noise_multiplier,
            k_stddevs=d.k_stddevs, beta=d.beta, prefix=tuple(self.prior))
        self.scale = self._sim_scale()
        if self.scale.modulus_bits > cfg.aggregation.secagg.bits:
            raise ConfigError(f"privacy.distributed.bits={d.bits} needs a {self.scale.modulus_bits}-bit secure sum: "
                              f"raise aggregation.secagg.bits to at least {self.scale.modulus_bits}")
        self.history: list[tuple[DiscreteRelease, float, int]] = []
        self._rotations: dict = {}

    # ------------------------------------------------------------------ the simulated cohort's integer grid
    def _sim_scale(self) -> CodecScale:
        P, m, M = self.params, self.expected_cohort, self.noise_cohort
        if m == M:
            return CodecScale(P.mechanism, P.gamma, P.l2, P.share_variance, P.bits)
        bits = P.bits - 0.5 * math.log2(M / m)
        share_model = m * P.variance / (P.min_survivors * P.gamma**2 * M)  # one sim share's variance, model units
        gamma = scale_for(bits, m, P.clip_bound, P.dim, share_model, P.k_stddevs)
        l2 = rounded_norm_bound(gamma * P.clip_bound, P.beta, P.dim)
        return CodecScale(P.mechanism, gamma, l2, share_model * gamma**2, modulus_bits(bits))

    def sim_noise_std_sum(self) -> float:
        """Std (model units) of the noise on the simulated cohort's sum when all m̄ expected devices add a share."""
        return math.sqrt(self.expected_cohort * self.scale.share_variance) / self.scale.gamma

    def codec_factory(self, ctx: RoundContext, cohort: int, aux_keys: tuple[str, ...], workers: int,
                      aux_bounds: tuple[float, ...] = ()) -> DistributedDPCodec:
        """The round's device codec (called by `SecureAggregator` instead of building a FixedPointCodec;
        `RemoteSecureAggregator` passes per-key `aux_bounds` for its side values)."""
        if abs(ctx.clip_bound - self.params.clip_bound) > 1e-12 * self.params.clip_bound:
            raise ConfigError("distributed DP needs the recipe's fixed clip bound (the parameters are calibrated for it)")
        if ctx.dim != self.dim:
            raise ConfigError(f"the round's release dimension {ctx.dim} differs from the calibrated {self.dim}")
        sa = self.cfg.aggregation.secagg
        # Shares split the noise over the realised cohort n (every device of the session knows n): the total is
        # the same whatever the Poisson draw; only dropouts lower it (and are charged, `charged_shares`).
        scale = replace(self.scale, share_variance=self.scale.share_variance * self.expected_cohort / max(cohort, 1))
        return codec_for_round(scale, ctx.dim, rotation_seed(ctx.seed, ctx.round),
                               self.cfg.privacy.distributed.rotation_block, sa.bits, cohort, aux_keys,
                               sa.max_weight, sa.aux_bound, self.params.clip_bound, self._rotations,
                               aux_bounds=aux_bounds)

    # ------------------------------------------------------------------ accounting
    def charged_shares(self, survivors: int, cohort: int) -> int:
        """Deployment shares (of variance V/n_min each) charged for a round in which `survivors` of the `cohort`
        sampled devices contributed. Each device's share is V/((1 − tolerance)·cohort), so the survivors' total is
        that of ⌊survivors·M/cohort⌋ deployment shares; charged at most n_min (more is post-processing)."""
        return min(self.params.min_survivors, math.floor(survivors * self.noise_cohort / max(cohort, 1)))

    def account_round(self, survivors: int, cohort: int, releases: int = 1) -> dict[str, float]:
        shares = self.charged_shares(survivors, cohort)
        if shares < 1:
            raise ConfigError("a round was released without any surviving noise share")
        rel = self.params.release(shares)
        if self.history and self.history[-1][0] == rel and self.history[-1][1] == self.q:
            self.history[-1] = (rel, self.q, self.history[-1][2] + releases)
        else:
            self.history.append((rel, self.q, releases))
        return {"epsilon": self.epsilon()}

    def epsilon(self, extra_rounds: int = 0) -> float:
        hist = list(self.history)
        if extra_rounds:
            hist.append((self.params.release(), self.q, extra_rounds))
        if not hist:
            return 0.0
        return epsilon(hist, self.delta, self.prior)

    def stop_reason(self, round_idx: int, pending_releases: int = 1) -> str | None:
        target = self.cfg.privacy.target_epsilon
        if target is None:
            return None
        eps = self.epsilon(extra_rounds=pending_releases)
        if eps <= target * (1 + 1e-9):
            return None
        return (f"stopping before round {round_idx}: its release would raise ε to {eps:.4g} > target {target:g} "
                f"(distributed {self.params.mechanism}, δ={self.delta:g})")

    def server_epsilon(self, rounds: int) -> float:
        """ε against the server, which knows who took part (no amplification): the user took part in `rounds`."""
        return epsilon([(self.params.release(), 1.0, rounds)], self.delta, [(s, 1.0, n) for s, _, n in self.prior])

    def summary(self) -> dict[str, Any]:
        P = self.params
        return {
            "distributed_dp": {**P.to_dict(), "sim_gamma": self.scale.gamma, "sim_l2": self.scale.l2,
                               "sim_share_variance": self.scale.share_variance,
                               "sim_modulus_bits": self.scale.modulus_bits,
                               "history": [[r.shares, q, n] for r, q, n in self.history]},
            "epsilon_adjacency": "a user's data is added/removed while its device's noise share stays in the sum "
                                 "(the participation count, which the SecAgg server sees anyway, is not covered)",
            # the server knows who took part: against it there is no amplification by sampling
            "server_epsilon_per_participation": self.server_epsilon(1),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"history": [[r.mechanism, r.l2, r.l1, r.variance, r.shares, r.dim, q, n] for r, q, n in self.history]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(DiscreteRelease(m, float(l2), float(l1), float(v), int(s), int(d)), float(q), int(n))
                        for m, l2, l1, v, s, d, q, n in state.get("history", [])]
