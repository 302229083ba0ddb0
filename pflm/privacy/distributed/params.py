"""Choosing the distributed-DP parameters: scale γ, rounded sensitivity, noise shares, bits and wrap-around margin.

`plan_parameters` calibrates, for a deployment of n devices per round (the noise cohort) of which at least
n_min = ⌊(1 − dropout_tolerance)·n⌋ survive, with b bits per coordinate:
  γ (integer units per unit of update) from the modular range rule of Kairouz et al. 2021 (§4.4, Eq. 61 form):
      2^b = 2k·√(n²γ²C²/D + n/4 + n·v)      (k standard deviations of the rotated noisy sum inside the range,
                                               v = one device's share variance, all n devices adding theirs)
  Δ₂ = conditional-rounding bound of γC, Δ₁ = Δ₂·min(√D, Δ₂),
  the total variance V of n_min shares (v = V/n_min) so that ε of `rounds` Poisson-subsampled releases ≤ target,
iterating γ ↔ V to a fixed point. The bound on the chance that a coordinate wraps, 2·exp(−k²/2) per coordinate,
assumes the rotated sum is sub-Gaussian with the variance above (the rotation makes each coordinate a weighted
sum of random signs; §4.2) — a heuristic for utility only: wrap-around never affects privacy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from pflm.errors import ConfigError
from pflm.privacy.distributed.accounting import DiscreteRelease, epsilon, l1_bound, rounded_norm_bound


@dataclass(frozen=True)
class DDPParameters:
    mechanism: str
    bits: int  # bits per coordinate of the modular sum
    devices: int  # n: devices per round the noise is split over (the noise cohort)
    min_survivors: int  # n_min: the noise of this many shares is what the accountant needs
    clip_bound: float  # C
    dim: int  # D: rotated (padded) dimension
    gamma: float  # integer units per unit of update
    l2: float  # Δ₂ (integer units)
    l1: float  # Δ₁
    variance: float  # V: total noise variance of n_min shares (integer units)
    k_stddevs: float
    beta: float

    @property
    def share_variance(self) -> float:
        return self.variance / self.min_survivors

    @property
    def noise_multiplier(self) -> float:
        """√V / Δ₂: the effective σ of the integer mechanism (Δ₂ includes the rounding's norm inflation)."""
        return math.sqrt(self.variance) / self.l2

    @property
    def rounding_inflation(self) -> float:
        return self.l2 / (self.gamma * self.clip_bound)

    def release(self, shares: int | None = None) -> DiscreteRelease:
        """What the accountant charges for a round whose survivors' noise is that of `shares` shares (≤ n_min)."""
        s = self.min_survivors if shares is None else min(int(shares), self.min_survivors)
        if s < 1:
            raise ConfigError("no surviving device: the round has no noise and cannot be charged")
        return DiscreteRelease(self.mechanism, self.l2, self.l1, self.share_variance * s, s, self.dim)

    def wrap_log2(self) -> float:
        """log2 of the (heuristic) bound on P[some coordinate of the sum wraps around]: D·2·exp(−k²/2)."""
        return math.log2(self.dim) + 1 - self.k_stddevs**2 / (2 * math.log(2))

    def sum_std(self, devices: int | None = None) -> float:
        """Std (model units) per coordinate of the sum's noise + rounding error when `devices` devices add theirs."""
        n = self.devices if devices is None else devices
        return math.sqrt(n * self.share_variance + n / 4.0) / self.gamma

    def payload_bytes(self) -> int:
        """Bytes of one device's masked vector for the update part: D coordinates of b bits."""
        return (self.dim * self.bits + 7) // 8

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(share_variance=self.share_variance, noise_multiplier=self.noise_multiplier,
                 rounding_inflation=self.rounding_inflation, wrap_log2=self.wrap_log2(),
                 payload_bytes=self.payload_bytes())
        return d


def honest_shares(n: int, degree: int, threshold: int, corrupt_fraction: float) -> int:
    """Honest devices whose shares are in any sum a SecAgg server can unmask: the threshold t for the complete
    graph (degree n − 1); for a SecAgg+ graph of degree k the fraction t/k of n (Bell et al.'s guarantee is of this
    form; an approximation). At most ⌈corrupt_fraction·n⌉ colluding devices may add no share."""
    k = degree or n - 1
    smallest = threshold if k >= n - 1 else math.ceil(threshold / k * n)
    return smallest - math.ceil(corrupt_fraction * n)


def honest_noise_multiplier(honest: int, share_variance: float, l2: float) -> float:
    """√(h·v)/Δ₂: the noise multiplier `honest` shares of variance v guarantee alone (0 when h < 1). What a node's
    policy floor (`policy.distributed.min_noise_multiplier`, pflm.flower.ddp_node) is compared with."""
    return math.sqrt(honest * share_variance) / l2 if honest >= 1 else 0.0


def scale_for(bits: float, n: int, clip: float, dim: int, share_variance_over_gamma2: float, k: float) -> float:
    """γ with 2^b = 2k·√(n²γ²C²/D + n/4 + n·v), v = (share std in model units)²·γ² (the share scales with γ)."""
    a = (n * clip) ** 2 / dim + n * share_variance_over_gamma2  # coefficient of γ²
    rhs = (2.0**bits / (2 * k)) ** 2 - n / 4.0
    if rhs <= 0:
        raise ConfigError(f"{bits:g} bits cannot hold the sum of {n} devices' rounding with k={k:g} standard "
                          "deviations: raise privacy.distributed.bits")
    return math.sqrt(rhs / a)


def _variance_for(target: float, mech: str, l2: float, l1: float, n_min: int, dim: int, q: float, rounds: int,
                  delta: float, prefix: tuple, guess: float = 1.0) -> float:
    """Smallest total variance V (bisection on z = √V/Δ₂, to 1e-4 relative) with ε ≤ target."""
    def eps(z: float) -> float:
        v = (z * l2) ** 2
        return epsilon([(DiscreteRelease(mech, l2, l1, v, n_min, dim), q, rounds)], delta, prefix)

    lo, hi = guess * 0.97, guess * 1.03
    if eps(lo) <= target:
        lo, hi = 0.01, lo
    while eps(hi) > target:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise ConfigError(f"ε={target:g} is unreachable with distributed noise: raise ε or δ, or use fewer rounds")
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-4 * hi:
            break
    return (hi * l2) ** 2


def plan_parameters(mechanism: str, bits: int, devices: int, dropout_tolerance: float, clip_bound: float, dim: int,
                    q: float, rounds: int, delta: float, target_epsilon: float | None = None,
                    noise_multiplier: float | None = None, k_stddevs: float = 4.0, beta: float = math.exp(-0.5),
                    prefix: tuple = ()) -> DDPParameters:
    """Parameters for a target ε (calibrated) or a given noise multiplier √V/Δ₂ (not calibrated)."""
    if (target_epsilon is None) == (noise_multiplier is None):
        raise ConfigError("give exactly one of a target ε and a noise multiplier for distributed DP")
    n_min = max(1, math.floor((1 - dropout_tolerance) * devices))
    z = noise_multiplier if noise_multiplier is not None else 1.0
    gamma = l2 = l1 = var = 0.0
    for _ in range(8):
        # v/γ² in model units: V = z²Δ₂², Δ₂ ≈ γC·inflation; solve γ with the current inflation estimate
        infl = l2 / (gamma * clip_bound) if gamma else 1.0
        gamma = scale_for(bits, devices, clip_bound, dim, (z * clip_bound * infl) ** 2 / n_min, k_stddevs)
        l2 = rounded_norm_bound(gamma * clip_bound, beta, dim)
        l1 = l1_bound(l2, dim)
        if target_epsilon is not None:
            var = _variance_for(target_epsilon, mechanism, l2, l1, n_min, dim, q, rounds, delta, prefix, z)
            z_new = math.sqrt(var) / l2
            if abs(z_new - z) < 1e-4 * z:
                z = z_new
                break
            z = z_new
        else:
            var = (z * l2) ** 2
    return DDPParameters(mechanism, bits, devices, n_min, clip_bound, dim, gamma, l2, l1, var, k_stddevs, beta)
