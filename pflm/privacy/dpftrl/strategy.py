"""DP-FTRL strategy matrices (BLT, banded square root, binary tree): coefficients, (k, b) sensitivity, error.

A matrix-factorisation mechanism releases C·x + z (z ~ N(0, σ²) per entry) for the stream x of per-round
aggregates, i.e. the server sees x̂ = x + C⁻¹z and any prefix sum A·x̂ = A·x + B·z with B = A·C⁻¹ (A the
lower-triangular all-ones prefix-sum workload). Privacy depends only on the sensitivity of C under the
participation rule (a user contributes ≤ C_clip per round, in ≤ k rounds at least b apart); utility on B.

* `blt`: Buffered Linear Toeplitz C (McMahan, Xu, Zhang 2024, arXiv 2404.16706): Toeplitz with c₀ = 1 and
  c_i = Σ_j ω_j θ_j^(i−1); θ, ω optimised here for the (n, k, b) max-loss (below). Streaming: one buffer per θ.
* `banded_mf`: banded Toeplitz square root of A (BSR, Kalinin & Lampert 2024, arXiv 2405.13763): the
  coefficients of (1 − x)^(−½), r_j = C(2j, j)/4^j, cut after `bands` (bands = 1 is the identity: DP-FedAvg).
* `tree`: binary-tree aggregation (Kairouz et al. 2021, arXiv 2103.00039; Honaker 2015): one Gaussian per
  complete dyadic interval; a prefix sum adds the nodes of its binary decomposition.

Sensitivity. For a strategy whose Gram matrix G = CᵀC is entrywise ≥ 0 the worst user puts the same unit
vector in every round of a participation pattern π, so sens² = max_π 1ᵀG_π1. For lower-triangular Toeplitz C
with non-negative, non-increasing coefficients the maximum is the pattern 0, b, 2b, … (Kalinin & Lampert
2024, Theorem 2): exact. Otherwise (tree) we use the upper bound of Choquette-Choo et al. 2023 (arXiv
2306.08153, Alg. 3–4): sens² ≤ VecSens(u) with u_i = VecSens(G_i·).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import optimize, signal

from pflm.errors import ConfigError

KINDS = ("blt", "banded_mf", "tree")


def max_participations(n: int, b: int, k: int) -> int:
    """The most rounds one user can join among n rounds at separation ≥ b, capped by k (0 = no cap)."""
    most = -(-n // max(b, 1))
    return most if k <= 0 else min(k, most)


# ---- Toeplitz helpers --------------------------------------------------------------------------------------
def toeplitz_matrix(coef: np.ndarray, n: int) -> np.ndarray:
    """The n×n lower-triangular Toeplitz matrix with first column `coef` (zero-padded)."""
    c = np.zeros(n)
    c[: min(n, len(coef))] = coef[:n]
    idx = np.arange(n)
    d = idx[:, None] - idx[None, :]
    return np.where(d >= 0, c[np.clip(d, 0, n - 1)], 0.0)


def inverse_coefs(coef: np.ndarray, n: int) -> np.ndarray:
    """First column of C⁻¹ for lower-triangular Toeplitz C (power-series reciprocal, c₀ ≠ 0)."""
    c = np.zeros(n)
    c[: min(n, len(coef))] = coef[:n]
    out = np.zeros(n)
    out[0] = 1.0 / c[0]
    for t in range(1, n):
        out[t] = -np.dot(c[1 : t + 1], out[t - 1 :: -1][:t]) / c[0]
    return out


def _monotone(coef: np.ndarray) -> bool:
    return bool(np.all(coef >= -1e-15) and np.all(np.diff(coef) <= 1e-12))


def toeplitz_sensitivity_squared(coef: np.ndarray, n: int, b: int, k: int) -> float:
    """Exact sens² for non-negative, non-increasing Toeplitz coefficients (Kalinin & Lampert 2024, Thm 2)."""
    c = np.zeros(n)
    c[: min(n, len(coef))] = coef[:n]
    if not _monotone(c):
        return vecsens_bound_squared(toeplitz_matrix(c, n), b, k)
    col = np.zeros(n)
    for p in range(max_participations(n, b, k)):
        col[p * b :] += c[: n - p * b]
    return float(col @ col)


# ---- general (k, b) sensitivity bound ------------------------------------------------------------------------
def vecsens(x: np.ndarray, b: int, k: int) -> np.ndarray:
    """Row-wise max over participation patterns π (≤ k indices, gaps ≥ b) of Σ_{j∈π} x[:, j], for x ≥ 0
    (Choquette-Choo et al. 2023, Alg. 3, vectorised over rows): dynamic programme in O(n·k) per row."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    rows, n = x.shape
    prev = np.zeros((rows, n + 1))  # best with c−1 picks among positions < j
    for _ in range(max_participations(n, b, k)):
        cur = np.zeros((rows, n + 1))
        for j in range(1, n + 1):
            p = j - 1  # pick position p: the previous pick must be ≤ p − b
            cur[:, j] = np.maximum(cur[:, j - 1], x[:, p] + prev[:, max(0, p - b + 1)])
        prev = cur
    return prev[:, n]


def vecsens_bound_squared(c_matrix: np.ndarray, b: int, k: int) -> float:
    """Upper bound on sens² of any strategy: max_π 1ᵀ|G|_π1 ≤ VecSens(u), u_i = VecSens(|G_i·|) (Alg. 4)."""
    g = np.abs(c_matrix.T @ c_matrix)
    u = vecsens(g, b, k)
    return float(vecsens(u[None, :], b, k)[0])


def brute_force_sensitivity_squared(c_matrix: np.ndarray, b: int, k: int) -> float:
    """Exact max_π 1ᵀG_π1 by enumerating every pattern (tests only: exponential in n)."""
    g = c_matrix.T @ c_matrix
    n = g.shape[0]
    best = 0.0

    def walk(start: int, chosen: list[int]) -> None:
        nonlocal best
        if chosen:
            best = max(best, float(g[np.ix_(chosen, chosen)].sum()))
        if len(chosen) == max_participations(n, b, k):
            return
        for j in range(start, n):
            walk(j + b, chosen + [j])

    walk(0, [])
    return best


# ---- the three strategies ----------------------------------------------------------------------------------
def bsr_coefs(n: int, bands: int) -> np.ndarray:
    """Banded square root of A: r_j = C(2j, j)/4^j for j < bands, then 0 (bands = 1: identity)."""
    r = np.zeros(n)
    r[0] = 1.0
    for j in range(1, min(bands, n)):
        r[j] = r[j - 1] * (2 * j - 1) / (2 * j)
    return r


def blt_coefs(omega: np.ndarray, theta: np.ndarray, n: int) -> np.ndarray:
    """c₀ = 1, c_i = Σ_j ω_j θ_j^(i−1)."""
    i = np.arange(1, n)
    return np.concatenate([[1.0], (omega[None, :] * theta[None, :] ** (i[:, None] - 1)).sum(axis=1)])


def blt_inverse_coefs(omega: np.ndarray, theta: np.ndarray, n: int) -> np.ndarray:
    """First column of C⁻¹ for a BLT: C(x) = 1 + Σ ω_j x/(1 − θ_j x) = P/Q, so C⁻¹ = Q/P (an IIR filter)."""
    q = np.array([1.0])
    for t in theta:
        q = np.convolve(q, [1.0, -t])
    p = np.concatenate([q, [0.0]])
    for j, w in enumerate(omega):
        rest = np.array([1.0])
        for l, t in enumerate(theta):
            if l != j:
                rest = np.convolve(rest, [1.0, -t])
        p[1 : 1 + len(rest)] += w * rest
    impulse = np.zeros(n)
    impulse[0] = 1.0
    return signal.lfilter(q, p, impulse)


def max_error_squared(inv_coef: np.ndarray) -> float:
    """max_t ‖row t of B = A·C⁻¹‖² for Toeplitz C: the last row (rows are prefixes of cumsum(C⁻¹ coefs))."""
    beta = np.cumsum(inv_coef)
    return float(beta @ beta)


def momentum_workload(n: int, momentum: float) -> np.ndarray:
    """A_β: the model after round t is w_0 + lr·Σ_s A_β[t, s]·x̂_s under heavy-ball momentum β (β = 0: A)."""
    t = np.arange(n)
    col = (1 - momentum ** (t + 1)) / (1 - momentum)
    return toeplitz_matrix(col, n)


def _blt_unpack(v: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    theta = 1.0 / (1.0 + np.exp(-v[:d]))
    w = np.exp(v[d : 2 * d] - v[d : 2 * d].max())
    scale = 1.0 / (1.0 + np.exp(-v[2 * d]))
    return scale * w / w.sum(), theta  # Σω ≤ 1 keeps c non-increasing (c₁ = Σω ≤ c₀ = 1)


@lru_cache(maxsize=32)
def optimize_blt(n: int, buffers: int, b: int, k: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(ω, θ) minimising the max-loss sens²_{k,b}(C) · max_t ‖(A C⁻¹)_t‖² (McMahan, Xu, Zhang 2024, §4),
    over BLTs with Σω ≤ 1, θ ∈ (0, 1) (non-negative, non-increasing: the sensitivity is then exact)."""
    d = int(buffers)

    def loss(v: np.ndarray) -> float:
        omega, theta = _blt_unpack(v, d)
        c = blt_coefs(omega, theta, n)
        val = toeplitz_sensitivity_squared(c, n, b, k) * max_error_squared(blt_inverse_coefs(omega, theta, n))
        return math.log(val) if np.isfinite(val) and val > 0 else 1e6

    best: tuple[float, np.ndarray] | None = None
    for spread in (1.0, 0.5):
        th0 = 1.0 - np.power(float(n), -spread * (np.arange(d) + 1) / d)
        th0 = np.clip(th0, 1e-3, 1 - 1e-6)
        v0 = np.concatenate([np.log(th0 / (1 - th0)), np.zeros(d), [0.0]])
        res = optimize.minimize(loss, v0, method="L-BFGS-B", options={"maxiter": 300})
        if best is None or res.fun < best[0]:
            best = (float(res.fun), res.x)
    assert best is not None
    omega, theta = _blt_unpack(best[1], d)
    return tuple(float(w) for w in omega), tuple(float(t) for t in theta)


# ---- tree ----------------------------------------------------------------------------------------------------
def tree_levels(n: int) -> int:
    """Levels 0..L with 2^L ≤ n: a dyadic node of level ℓ is released once its 2^ℓ rounds are complete."""
    return int(math.floor(math.log2(n))) + 1


def tree_matrix(n: int) -> np.ndarray:
    """C for tree aggregation: one row per complete dyadic interval [j·2^ℓ, (j+1)·2^ℓ) ⊆ [0, n)."""
    rows = []
    for lvl in range(tree_levels(n)):
        w = 1 << lvl
        for j in range(n // w):
            r = np.zeros(n)
            r[j * w : (j + 1) * w] = 1.0
            rows.append(r)
    return np.array(rows)


def tree_nodes(m: int) -> set[tuple[int, int]]:
    """(level, index) of the dyadic nodes whose sum is the prefix of length m (its binary decomposition)."""
    out, start = set(), 0
    for lvl in range(max(m, 1).bit_length() - 1, -1, -1):
        if m & (1 << lvl):
            out.add((lvl, start >> lvl))
            start += 1 << lvl
    return out


# ---- one object per configured strategy -----------------------------------------------------------------------
@dataclass(frozen=True)
class Strategy:
    """The run's strategy for n rounds under (k, b) participation, with its parameters (all public)."""

    kind: str
    n: int
    min_separation: int
    max_participations: int
    buffers: int = 0
    bands: int = 0
    omega: tuple[float, ...] = ()
    theta: tuple[float, ...] = ()

    @property
    def k(self) -> int:
        return max_participations(self.n, self.min_separation, self.max_participations)

    def coefs(self, n: int | None = None) -> np.ndarray:
        n = self.n if n is None else n
        if self.kind == "blt":
            return blt_coefs(np.array(self.omega), np.array(self.theta), n)
        if self.kind == "banded_mf":
            return bsr_coefs(n, self.bands)
        raise ConfigError("the tree strategy is not Toeplitz")

    def matrix(self, n: int | None = None) -> np.ndarray:
        n = self.n if n is None else n
        return tree_matrix(n) if self.kind == "tree" else toeplitz_matrix(self.coefs(n), n)

    def noise_matrix(self, n: int | None = None) -> np.ndarray:
        """C⁻¹ as it acts on the per-round noise: x̂_t = x_t + (M z)_t with M = C⁻¹ (tree: B − shifted B)."""
        n = self.n if n is None else n
        if self.kind != "tree":
            return toeplitz_matrix(inverse_coefs(self.coefs(n), n), n)
        c = tree_matrix(n)
        index = {}
        for lvl in range(tree_levels(n)):
            for j in range(n >> lvl):
                index[(lvl, j)] = len(index)
        prefix = np.zeros((n + 1, c.shape[0]))
        for m in range(1, n + 1):
            for node in tree_nodes(m):
                prefix[m, index[node]] = 1.0
        return prefix[1:] - prefix[:-1]

    def sensitivity(self, rounds: int | None = None) -> float:
        """L2 sensitivity (per unit clip bound) of the first `rounds` releases under (k, b) participation."""
        n = self.n if rounds is None else max(1, min(int(rounds), self.n))
        return _sensitivity(self, n)

    def max_error_squared(self) -> float:
        """max_t ‖(B)_t‖²: variance (per σ²) of the worst prefix sum's noise."""
        if self.kind == "tree":
            return float(max(bin(m).count("1") for m in range(1, self.n + 1)))
        return max_error_squared(inverse_coefs(self.coefs(), self.n))

    def model_error_squared(self, momentum: float = 0.0) -> float:
        """max_t ‖row t of A_β·C⁻¹‖² (per σ²): variance of the model's noise per coordinate under FedAvgM with
        momentum β (A_β[t, s] = Σ_{u=s..t} β^(u−s); β = 0 is the prefix sum, = max_error_squared)."""
        if momentum == 0.0:
            return self.max_error_squared()
        b = momentum_workload(self.n, momentum) @ self.noise_matrix()
        return float((b**2).sum(axis=1).max())

    def row_norms(self) -> np.ndarray:
        """‖(C⁻¹)_t‖ per round: the std (per σ·C·m̄/M) of the noise one coordinate gets in round t."""
        if self.kind == "tree":
            return np.array([math.sqrt(len(tree_nodes(t + 1) ^ tree_nodes(t))) for t in range(self.n)])
        inv = inverse_coefs(self.coefs(), self.n)
        return np.sqrt(np.cumsum(inv**2))

    def describe(self) -> dict:
        return {"kind": self.kind, "rounds": self.n, "min_separation": self.min_separation,
                "max_participations": self.k, "buffers": self.buffers, "bands": self.bands,
                "omega": list(self.omega), "theta": list(self.theta)}


@lru_cache(maxsize=256)
def _sensitivity(s: Strategy, n: int) -> float:
    if s.kind == "tree":
        return math.sqrt(vecsens_bound_squared(tree_matrix(n), s.min_separation, s.k))
    return math.sqrt(toeplitz_sensitivity_squared(s.coefs(n), n, s.min_separation, s.k))


def make_strategy(kind: str, n: int, min_separation: int, max_parts: int, buffers: int = 4, bands: int = 0) -> Strategy:
    """The strategy of a run (BLT parameters optimised for its n, k, b; bands 0 = min_separation)."""
    if kind not in KINDS:
        raise ConfigError(f"unknown DP-FTRL kind {kind!r}: use one of {', '.join(KINDS)}")
    if n < 1 or min_separation < 1:
        raise ConfigError(f"DP-FTRL needs rounds ≥ 1 and min_separation ≥ 1 (got {n}, {min_separation})")
    k = max_participations(n, min_separation, max_parts)
    if kind == "blt":
        if buffers < 1:
            raise ConfigError(f"privacy.dpftrl.buffers={buffers} is invalid: use at least 1 buffer")
        omega, theta = optimize_blt(n, buffers, min_separation, k)
        return Strategy("blt", n, min_separation, max_parts, buffers=buffers, omega=omega, theta=theta)
    if kind == "banded_mf":
        p = bands or min_separation
        if p < 1:
            raise ConfigError(f"privacy.dpftrl.bands={bands} is invalid: use ≥ 1 (1 = independent noise)")
        return Strategy("banded_mf", n, min_separation, max_parts, bands=min(p, n))
    return Strategy("tree", n, min_separation, max_parts)
