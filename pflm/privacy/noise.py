"""Central DP: Gaussian noise on the aggregate, drawn from the run's secret keyed CSPRNG (`pflm.secure_random`)."""

from __future__ import annotations

import math
from dataclasses import replace
import torch

from pflm.round import AggregateResult, RoundContext
from pflm.errors import ConfigError
from pflm.privacy.base import Postprocessor
from pflm.secure_random import SecureRandom

class GaussianNoisePostprocessor(Postprocessor):
    """Server side: add N(0, (σ·C·m̄/M)²) to every coordinate of the sum of the clipped updates.

    σ is the noise multiplier, C the round's clip bound (`ctx.clip_bound`), m̄ the *expected* cohort (the
    configured cohort size: public, the same every round) and M the *noise cohort* (default m̄). The std
    never depends on the realised cohort: under Poisson sampling the number of participants is itself
    private, and scaling by it would both leak it and cut the noise below what the accountant assumes.
    A deployment with M users per round adds noise of std σ·C to their sum (sensitivity C), so the average
    (divided by M) has noise std σ·C/M. A simulation that trains m̄ < M users scales the noise on its sum by
    m̄/M, so its average has the same std σ·C/M (pfl-research's StackOverflow benchmark: m̄ = 400 simulated,
    M = 5,000, population 1e6). The ε then refers to cohort M: account with q = M/N. σ = 0 adds nothing.
    """

    def __init__(
        self,
        noise_multiplier: float,
        generator: SecureRandom,
        expected_cohort: int,
        noise_cohort: int | None = None,
        purpose: str = "update",
    ) -> None:
        if not noise_multiplier >= 0 or math.isinf(noise_multiplier):
            raise ConfigError(f"noise_multiplier={noise_multiplier} is invalid: use a finite σ ≥ 0")
        for name, v in (("expected_cohort", expected_cohort), ("noise_cohort", noise_cohort)):
            if v is not None and (isinstance(v, bool) or int(v) < 1):
                raise ConfigError(f"{name}={v} is invalid: use a positive user count")
        self.noise_multiplier = float(noise_multiplier)
        self.generator = generator
        self.expected_cohort = int(expected_cohort)
        self.noise_cohort = self.expected_cohort if noise_cohort is None else int(noise_cohort)
        self.purpose = purpose

    def noise_std_on_sum(self, ctx: RoundContext) -> float:
        return self.noise_multiplier * float(ctx.clip_bound) * self.expected_cohort / self.noise_cohort

    def on_server(self, agg: AggregateResult, ctx: RoundContext) -> tuple[AggregateResult, dict[str, float]]:
        if self.noise_multiplier == 0:
            return agg, {"noise_std_sum": 0.0, "noise_std_mean": 0.0}
        if math.isinf(ctx.clip_bound):
            raise ConfigError("Gaussian noise needs a finite clip bound: set clip_bound or noise_multiplier=0")
        std = self.noise_std_on_sum(ctx)
        noise = self.generator.normal(ctx.round, agg.total.shape, std, ctx.stream(self.purpose), dtype=torch.float64)
        total = (agg.total.to(torch.float64) + noise).to(agg.total.dtype)
        metrics = {
            "noise_std_sum": std,
            "noise_std_mean": std / self.expected_cohort,  # = σ·C/M: noise std per coordinate of the average
            "noise_norm_mean": std / self.expected_cohort * math.sqrt(agg.total.numel()),
        }
        return replace(agg, total=total), metrics
