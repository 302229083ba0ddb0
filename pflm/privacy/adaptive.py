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
from dataclasses import replace
from typing import Any

import torch

from pflm.round import AggregateResult, RoundContext
from pflm.config import AdaptiveClipConfig
from pflm.errors import ConfigError
from pflm.privacy.accountant import combine_noise_multipliers
from pflm.privacy.clipping import UNCLIPPED, L2Clip
from pflm.secure_random import SecureRandom

AUX_KEY = UNCLIPPED
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


class AdaptiveClipping(L2Clip):
    """Clips on the device like `L2Clip` (use it *instead of* L2Clip) and adapts C between rounds.

    Chain: [AdaptiveClipping(...), GaussianNoisePostprocessor(ac.update_noise_multiplier, gen, m̄, M)]. The
    settings are the recipe's own `privacy.adaptive_clipping` (`pflm.config.AdaptiveClipConfig`); the run adds
    the initial C, the budget's total σ, the expected cohort m̄ and the noise cohort M.
    `clip_bound` is the C of the next round (the run's `DPMechanism.clip_bound_for` reads it); `on_server` releases the
    noisy count and computes the next C. State (C) round-trips through state_dict for exact resume.
    """

    def __init__(
        self,
        settings: AdaptiveClipConfig,
        initial_clip_bound: float,
        noise_multiplier: float,
        expected_cohort: int,
        noise_cohort: int | None,
        generator: SecureRandom,
    ) -> None:
        if not 0 < initial_clip_bound < math.inf:
            raise ConfigError(f"initial_clip_bound={initial_clip_bound} is invalid: use a finite C > 0")
        if not 0 <= noise_multiplier < math.inf:
            raise ConfigError(f"noise_multiplier={noise_multiplier} is invalid: use a finite σ ≥ 0")
        if expected_cohort < 1:
            raise ConfigError(f"expected_cohort={expected_cohort} is invalid: give the configured cohort size")
        if noise_cohort is not None and noise_cohort < 1:
            raise ConfigError(f"noise_cohort={noise_cohort} is invalid: use a positive user count or None")
        if settings.count_noise_std:
            self.count_noise_std = float(settings.count_noise_std)
        elif noise_cohort is not None:
            self.count_noise_std = noise_cohort / 20.0  # the paper's default σ_b = M/20
        else:
            raise ConfigError("adaptive clipping needs count_noise_std or a noise cohort (σ_b = noise_cohort/20)")
        super().__init__(report_unclipped=True)  # devices report b = 1 − clipped (`L2Clip`)
        self.settings = settings
        self.noise_multiplier = float(noise_multiplier)
        self.expected_cohort = int(expected_cohort)
        self.noise_cohort = noise_cohort
        self.generator = generator
        self.clip_bound = float(initial_clip_bound)
        update_noise_multiplier(self.noise_multiplier, self.count_noise_std)  # checks 2σ_b > σ

    @property
    def update_noise_multiplier(self) -> float:
        """σ_Δ for the GaussianNoisePostprocessor."""
        return update_noise_multiplier(self.noise_multiplier, self.count_noise_std)

    @property
    def accounting_noise_multipliers(self) -> tuple[float, float]:
        """(σ_Δ, 2σ_b): the two same-cohort releases per round, to pass to RunningAccountant.step."""
        return (self.update_noise_multiplier, 2.0 * self.count_noise_std)

    @property
    def effective_noise_multiplier(self) -> float:
        """σ the accountant sees per round: equals the configured total σ (0 when σ = 0)."""
        return combine_noise_multipliers(self.accounting_noise_multipliers)

    def on_server(self, agg: AggregateResult, ctx: RoundContext) -> tuple[AggregateResult, dict[str, float]]:
        m = self.expected_cohort
        big_m = self.noise_cohort or m
        std = self.count_noise_std * m / big_m
        noise = 0.0
        if std > 0:
            noise = float(self.generator.normal(ctx.round, (1,), std, ctx.stream(COUNT_PURPOSE), dtype=torch.float64)[0])
        noisy_count = float(agg.aux.get(AUX_KEY, 0.0)) + noise
        frac = noisy_count / m
        used = float(ctx.clip_bound)
        self.clip_bound = used * math.exp(-self.settings.learning_rate * (frac - self.settings.target_quantile))
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
