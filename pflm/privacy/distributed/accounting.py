"""RDP accounting of distributed discrete noise (Skellam, distributed discrete Gaussian) with Poisson subsampling.

Per-round mechanism (integer domain after rotation and scaling by γ): the sum over the round's surviving devices of
(x̃_v + z_v) with x̃_v the conditionally rounded update (‖x̃_v‖₂ ≤ Δ₂, ‖x̃_v‖₁ ≤ Δ₁ = Δ₂·min(√D, Δ₂)) and z_v the
device's noise share. Modular reduction and the server's unscaling are post-processing.

* Skellam (Agarwal, Kairouz, Liu, NeurIPS 2021, arXiv:2110.04995, multi-dimensional Skellam RDP theorem):
  adding Sk(μ, μ) per coordinate (variance 2μ) is (α, ε(α))-RDP with
  ε(α) = αΔ₂²/(4μ) + min(((2α − 1)Δ₂² + 6Δ₁)/(16μ²), 3Δ₁/(4μ)).  n shares Sk(λ, λ) sum to Sk(nλ, nλ).
* Distributed discrete Gaussian (Kairouz, Liu, Steinke, ICML 2021, arXiv:2102.06387, Thm. 1 / Prop. 14): the sum
  of n shares N_Z(0, σ²) is (α, ε(α))-RDP with ε(α) = min(α s₂²/2 + τD, α(s₂² + 2 s₁τ + τ²D)/2,
  α(s₂ + τ√D)²/2), s_p = Δ_p/(√n σ), τ = 10 Σ_{k=1}^{n−1} exp(−2π²σ² k/(k+1)).
* Poisson subsampling with rate q: the general upper bound of Zhu & Wang (ICML 2019, "Poisson subsampled Rényi
  differential privacy", Thm. 5), valid for any mechanism given its RDP at integer orders, capped by the
  un-subsampled ε(α). Only integer orders are used.
* Noise from more survivors than accounted is post-processing (an independent extra share), so the accountant may
  charge any survivor count ≤ the real one.
* RDP → (ε, δ): Opacus' conversion (`get_privacy_spent`), the same as the central Gaussian accountant; earlier
  Gaussian releases (a DP vocabulary) are added as RDP curves at the same orders (Opacus `compute_rdp`).

Adjacency: a user's data is added or removed while its device's noise share stays in the sum (the device takes part
either way); see docs/distributed_dp.md for what this leaves out (the participation count, visible to the server
in any SecAgg deployment).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent
from scipy import special

from pflm.errors import ConfigError

ORDERS: tuple[int, ...] = tuple(range(2, 65)) + (72, 80, 96, 112, 128, 160, 192, 256)
MECHANISMS = ("distributed_skellam", "distributed_dgauss")


def rounded_norm_bound(norm: float, beta: float, dim: int) -> float:
    """Δ₂ after conditional randomised rounding of a vector of norm ≤ `norm` in `dim` coordinates
    (Kairouz et al. 2021, Thm. 1 / Prop. 22): min(‖x‖ + √D, √(‖x‖² + D/4 + √(2 ln(1/β))·(‖x‖ + √D/2)))."""
    b1 = norm + math.sqrt(dim)
    if beta <= 0:
        return b1
    b2 = math.sqrt(norm * norm + 0.25 * dim + math.sqrt(2.0 * math.log(1.0 / beta)) * (norm + 0.5 * math.sqrt(dim)))
    return min(b1, b2)


def l1_bound(l2: float, dim: int) -> float:
    """Δ₁ of an integer vector with ‖·‖₂ ≤ l2: ‖x‖₁ ≤ √D‖x‖₂ and, for integers, ‖x‖₁ ≤ ‖x‖₂²."""
    return l2 * min(math.sqrt(dim), l2)


def skellam_rdp(alpha: int, l2: float, l1: float, mu: float) -> float:
    """RDP at order α of adding Sk(μ, μ) (variance 2μ) to a query of sensitivities (Δ₂, Δ₁)."""
    return alpha * l2 * l2 / (4 * mu) + min(((2 * alpha - 1) * l2 * l2 + 6 * l1) / (16 * mu * mu), 3 * l1 / (4 * mu))


@functools.lru_cache(maxsize=256)
def ddgauss_tau(sigma2: float, n: int) -> float:
    """τ of Kairouz et al. 2021 Thm. 1 for n shares N_Z(0, σ²)."""
    if n <= 1:
        return 0.0
    k = np.arange(1, n, dtype=np.float64)
    return float(10.0 * np.sum(np.exp(-2.0 * math.pi**2 * sigma2 * k / (k + 1))))


def ddgauss_rdp(alpha: int, l2: float, l1: float, sigma2: float, n: int, dim: int) -> float:
    """RDP at order α of the sum of n shares N_Z(0, σ²) added to a query of sensitivities (Δ₂, Δ₁) in D coordinates."""
    tau = ddgauss_tau(sigma2, n)
    s2 = l2 / math.sqrt(n * sigma2)
    s1 = l1 / math.sqrt(n * sigma2)
    return min(alpha * s2 * s2 / 2 + tau * dim, alpha * (s2 * s2 + 2 * s1 * tau + tau * tau * dim) / 2,
               alpha * (s2 + math.sqrt(dim) * tau) ** 2 / 2)


def subsampled_rdp(eps: Callable[[int], float], q: float, alpha: int) -> float:
    """Zhu & Wang 2019 general upper bound on the RDP of the Poisson-subsampled mechanism (rate q) at integer α:
    (1/(α−1))·log[(1−q)^(α−1)(αq − q + 1) + C(α,2)q²(1−q)^(α−2)e^{ε(2)} + 3Σ_{j≥3} C(α,j)q^j(1−q)^(α−j)e^{(j−1)ε(j)}],
    capped by the un-subsampled ε(α)."""
    if q >= 1:
        return eps(alpha)
    if q <= 0:
        return 0.0
    return _subsampled(np.array([0.0, 0.0] + [eps(j) for j in range(2, alpha + 1)]), q, alpha)


def _subsampled(e: np.ndarray, q: float, alpha: int) -> float:
    """The bound above from e[j] = ε(j) (j = 2..α; e[0], e[1] unused)."""
    j = np.arange(2, alpha + 1, dtype=np.float64)
    log_binom = special.gammaln(alpha + 1) - special.gammaln(j + 1) - special.gammaln(alpha - j + 1)
    terms = log_binom + j * math.log(q) + (alpha - j) * math.log1p(-q) + (j - 1) * e[2 : alpha + 1]
    terms[1:] += math.log(3.0)  # j ≥ 3 carry the factor 3; j = 2 has e^{(2−1)ε(2)} = e^{ε(2)} without it
    first = math.log((1 - q) ** (alpha - 1) * (alpha * q - q + 1))
    return min(float(special.logsumexp(np.concatenate(([first], terms)))) / (alpha - 1), float(e[alpha]))


@dataclass(frozen=True)
class DiscreteRelease:
    """One round's mechanism as the accountant charges it (integer units)."""

    mechanism: str
    l2: float  # Δ₂ of one device's rounded vector
    l1: float  # Δ₁
    variance: float  # total noise variance per coordinate of the charged survivors' shares
    shares: int  # number of shares charged (DDGauss τ)
    dim: int  # rotated (padded) dimension D

    def rdp(self, alpha: int) -> float:
        if self.mechanism == "distributed_skellam":
            return skellam_rdp(alpha, self.l2, self.l1, self.variance / 2)
        return ddgauss_rdp(alpha, self.l2, self.l1, self.variance / self.shares, self.shares, self.dim)


def rdp_curve(release: DiscreteRelease, q: float, count: int = 1, orders: Sequence[int] = ORDERS) -> np.ndarray:
    """RDP at `orders` of `count` Poisson-subsampled rounds of `release`."""
    top = max(orders)
    e = np.array([0.0, 0.0] + [release.rdp(a) for a in range(2, top + 1)])
    if q >= 1:
        return e[list(orders)] * count
    return np.array([_subsampled(e, q, a) for a in orders]) * count


def epsilon(history: Sequence[tuple[DiscreteRelease, float, int]], delta: float,
            gaussian_prefix: Sequence[tuple[float, float, int]] = (), orders: Sequence[int] = ORDERS) -> float:
    """ε(δ) of the composed discrete rounds ((release, q, count) runs) after Gaussian releases ((σ, q, count))."""
    if not 0 < delta < 1:
        raise ConfigError(f"delta={delta:g} is invalid: use 0 < δ < 1")
    total = np.zeros(len(orders))
    for s, q, n in gaussian_prefix:
        if n > 0 and q > 0:
            total += np.asarray(compute_rdp(q=q, noise_multiplier=s, steps=n, orders=list(orders)), dtype=np.float64)
    for rel, q, n in history:
        if n > 0 and q > 0:
            total += rdp_curve(rel, q, n, orders)
    if not total.any():
        return 0.0
    with warnings.catch_warnings():  # "optimal order is the largest/smallest alpha": the grid is fixed and stated
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        eps, _ = get_privacy_spent(orders=list(orders), rdp=list(total), delta=delta)
    return float(eps)
