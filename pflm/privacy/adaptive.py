"""Quantile-based adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping").

Per round, with clip bound C:
  device:  clips Δ to C and reports b = 1[‖Δ‖ ≤ C] (aux "unclipped"; b = 1 − "clipped");
  server:  b̄ = (Σ b + N(0, σ_b'²)) / m̄     (m̄ the expected cohort; σ_b' = σ_b·m̄/M with the noise-cohort
                                               option, else σ_b — never the realised cohort, which is private)
           C ← C · exp(−η (b̄ − γ))         (geometric update; converges to the γ-quantile of ‖Δ‖).

Privacy (paper, Theorem 1). Centring b to b − ½ gives the count query sensitivity ½, so its noise
multiplier is 2σ_b. The count and the update sum (noise multiplier σ_Δ) are computed on the same cohort,
so together they are one Gaussian mechanism with σ = (σ_Δ⁻² + (2σ_b)⁻²)^(−½). To keep a total noise
multiplier σ (the one the budget was calibrated for) the update noise becomes
    σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−½),   which requires 2σ_b > σ.
Account each round with `accounting_noise_multipliers` = (σ_Δ, 2σ_b) (the RunningAccountant combines them
back to σ). Only the noisy count leaves this step; the exact count and the realised cohort size do not.
Paper defaults: γ = 0.5, η = 0.2, σ_b = M/20.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import torch

from pflm.round import AggregateResult, RoundContext
from pflm.errors import ConfigError
from pflm.privacy.accountant import combine_noise_multipliers
from pflm.privacy.clipping import L2Clip
from pflm.privacy.noise import SecureGaussian

AUX_KEY = "unclipped"
COUNT_PURPOSE = "clip-count"


def update_noise_multiplier(total_noise_multiplier: float, count_noise_std: float) -> float:
    """σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−½): update noise that, with the count noise σ_b, totals σ."""
    sigma, sigma_b = float(total_noise_multiplier), float(count_noise_std)
    if sigma < 0 or sigma_b < 0:
        raise ConfigError("noise multipliers must be ≥ 0")
    if sigma == 0:
        return 0.0
    if not 2 * sigma_b > sigma:
        raise ConfigError(
            f"adaptive clipping needs 2·σ_b > σ (σ_b={sigma_b:g}, σ={sigma:g}): raise count_noise_std "
            "(paper default: noise cohort / 20)"
        )
    return (sigma**-2 - (2 * sigma_b) ** -2) ** -0.5


@dataclass
class AdaptiveClippingConfig:
    """Settings of quantile-based adaptive clipping; `noise_multiplier` is the *total* σ of the budget."""

    initial_clip_bound: float
    noise_multiplier: float
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_noise_std: float | None = None  # σ_b on the noise cohort's count; None → noise_cohort / 20
    noise_cohort: int | None = None  # M (None: the expected cohort; then count_noise_std must be given)
    expected_cohort: int = 0  # m̄: the configured (expected) cohort size; required

    def __post_init__(self) -> None:
        if not 0 < self.initial_clip_bound < math.inf:
            raise ConfigError(f"initial_clip_bound={self.initial_clip_bound} is invalid: use a finite C > 0")
        if not 0 < self.target_quantile < 1:
            raise ConfigError(f"target_quantile={self.target_quantile} is invalid: use 0 < γ < 1 (e.g. 0.5)")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate={self.learning_rate} is invalid: use η > 0 (e.g. 0.2)")
        if not 0 <= self.noise_multiplier < math.inf:
            raise ConfigError(f"noise_multiplier={self.noise_multiplier} is invalid: use a finite σ ≥ 0")
        if self.expected_cohort < 1:
            raise ConfigError(f"expected_cohort={self.expected_cohort} is invalid: give the configured cohort size")
        if self.noise_cohort is not None and self.noise_cohort < 1:
            raise ConfigError(f"noise_cohort={self.noise_cohort} is invalid: use a positive user count or None")
        if self.count_noise_std is None:
            if self.noise_cohort is None:
                raise ConfigError("adaptive clipping needs count_noise_std or noise_cohort (σ_b = noise_cohort/20)")
            self.count_noise_std = self.noise_cohort / 20.0
        if not 0 <= self.count_noise_std < math.inf:
            raise ConfigError(f"count_noise_std={self.count_noise_std} is invalid: use a finite σ_b ≥ 0")
        update_noise_multiplier(self.noise_multiplier, self.count_noise_std)  # checks 2σ_b > σ


class AdaptiveClipping(L2Clip):
    """Clips on the device like `L2Clip` (use it *instead of* L2Clip) and adapts C between rounds.

    Chain: [AdaptiveClipping(cfg, gen), GaussianNoisePostprocessor(ac.update_noise_multiplier, gen, m̄, M)].
    `clip_bound` is the C of the next round (the run's `DPMechanism.clip_bound_for` reads it); `on_server` releases the
    noisy count and computes the next C. State (C) round-trips through state_dict for exact resume.
    """

    def __init__(self, config: AdaptiveClippingConfig, generator: SecureGaussian) -> None:
        self.config = config
        self.generator = generator
        self.clip_bound = float(config.initial_clip_bound)

    @property
    def count_noise_std(self) -> float:
        assert self.config.count_noise_std is not None
        return float(self.config.count_noise_std)

    @property
    def update_noise_multiplier(self) -> float:
        """σ_Δ for the GaussianNoisePostprocessor."""
        return update_noise_multiplier(self.config.noise_multiplier, self.count_noise_std)

    @property
    def accounting_noise_multipliers(self) -> tuple[float, float]:
        """(σ_Δ, 2σ_b): the two same-cohort releases per round, to pass to RunningAccountant.step."""
        return (self.update_noise_multiplier, 2.0 * self.count_noise_std)

    @property
    def effective_noise_multiplier(self) -> float:
        """σ the accountant sees per round: equals the configured total σ (0 when σ = 0)."""
        return combine_noise_multipliers(self.accounting_noise_multipliers)

    def on_device(self, update: torch.Tensor, ctx: RoundContext) -> tuple[torch.Tensor, dict[str, float]]:
        clipped, aux = super().on_device(update, ctx)
        aux[AUX_KEY] = 1.0 - aux["clipped"]
        return clipped, aux

    def on_server(self, agg: AggregateResult, ctx: RoundContext) -> tuple[AggregateResult, dict[str, float]]:
        m = self.config.expected_cohort
        big_m = self.config.noise_cohort or m
        std = self.count_noise_std * m / big_m
        noise = 0.0
        if std > 0:
            noise = float(self.generator.normal(ctx.round, (1,), std, COUNT_PURPOSE, dtype=torch.float64)[0])
        noisy_count = float(agg.aux.get(AUX_KEY, 0.0)) + noise
        frac = noisy_count / m
        used = float(ctx.clip_bound)
        self.clip_bound = used * math.exp(-self.config.learning_rate * (frac - self.config.target_quantile))
        aux = dict(agg.aux)
        aux[AUX_KEY] = noisy_count  # only the noised count leaves this step
        metrics = {
            "clip_bound": used,
            "next_clip_bound": self.clip_bound,
            "noisy_unclipped_fraction": frac,
            "count_noise_std": std,
        }
        return replace(agg, aux=aux), metrics

    def state_dict(self) -> dict[str, Any]:
        return {"clip_bound": self.clip_bound}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        c = float(state["clip_bound"])
        if not 0 < c < math.inf:
            raise ConfigError(f"saved adaptive clip bound {c} is invalid: the checkpoint is corrupt")
        self.clip_bound = c
