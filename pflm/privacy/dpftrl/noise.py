"""Streaming correlated noise for DP-FTRL: round t's noise (C⁻¹z)_t from the run key, in O(buffers × d) memory.

z_t ~ N(0, I_d) is the secret keyed stream (`SecureRandom`, purpose "dpftrl", index t): nothing depends on the
public seed unless the run is in reproducible mode, and a resumed run re-derives exactly the same z_t. The
postprocessor adds σ·C_t·(m̄/M)·(C⁻¹z)_t to the round's sum (C_t the round's clip bound), i.e. it releases
x̂ with C·(x̂/c) = C·(x/c) + σ·z: one Gaussian mechanism on the normalised stream (see accounting.py).

* BLT: y_t = z_t − Σ_j ω_j s_j, then s_j ← θ_j s_j + y_t (solves C·y = z; one d-vector per buffer).
* banded: y_t = z_t − Σ_{i<p} c_i y_{t−i} (the last p−1 outputs).
* tree: y_t = T(t+1) − T(t), T(m) = Σ of the node noises of m's binary decomposition; each node's noise is
  its own keyed stream, so nothing is stored (≤ 2·log₂n node draws per round).

The buffers are not checkpointed (they are as secret as the noise): after a resume the stream fast-forwards
from round 0 by redrawing z_0 … z_{t−1} from the key (cost: t draws of d Gaussians, once).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from pflm.errors import ConfigError, PflmError
from pflm.privacy.base import Postprocessor
from pflm.privacy.dpftrl.strategy import Strategy, tree_nodes
from pflm.round import AggregateResult, RoundContext
from pflm.secure_random import SecureRandom

PURPOSE = "dpftrl"
_NODE_BITS = 48  # tree node (level, j) uses stream index level·2^48 + j


class CorrelatedNoise:
    """The unit-variance correlated stream y = C⁻¹z of one strategy, drawn round by round (in order)."""

    def __init__(self, strategy: Strategy, generator: SecureRandom, purpose: str = PURPOSE) -> None:
        self.strategy = strategy
        self.generator = generator
        self.purpose = purpose
        self.reset()

    def reset(self) -> None:
        self.next_round = 0
        self.dim: int | None = None
        self._buffers: list[torch.Tensor] = []  # BLT: s_j; banded: y_{t−1}, y_{t−2}, …

    def _z(self, t: int, dim: int) -> torch.Tensor:
        return self.generator.standard_normal(t, dim, self.purpose)

    def _tree_prefix(self, m: int, dim: int, skip: set) -> torch.Tensor:
        out = torch.zeros(dim, dtype=torch.float64)
        for lvl, j in sorted(tree_nodes(m) - skip):
            out += self.generator.standard_normal((lvl << _NODE_BITS) + j, dim, self.purpose)
        return out

    def _step(self, t: int, dim: int) -> torch.Tensor:
        s = self.strategy
        if s.kind == "tree":
            now, before = tree_nodes(t + 1), tree_nodes(t)
            common = now & before  # nodes in both decompositions cancel
            return self._tree_prefix(t + 1, dim, common) - self._tree_prefix(t, dim, common)
        z = self._z(t, dim)
        if s.kind == "blt":
            if not self._buffers:
                self._buffers = [torch.zeros(dim, dtype=torch.float64) for _ in s.theta]
            y = z
            for w, buf in zip(s.omega, self._buffers):
                y.add_(buf, alpha=-w)
            for th, buf in zip(s.theta, self._buffers):
                buf.mul_(th).add_(y)
            return y
        coefs = s.coefs(s.bands)  # banded: c_1 … c_{p−1} against the last outputs
        y = z
        for c, prev in zip(coefs[1:], self._buffers):
            y.add_(prev, alpha=-float(c))
        if s.bands > 1:
            self._buffers = [y.clone(), *self._buffers][: s.bands - 1]
        return y

    def noise(self, t: int, dim: int) -> torch.Tensor:
        """(C⁻¹z)_t as float64 [dim]; rounds before t that were never asked for are drawn and discarded
        (fast-forward), and asking for an earlier round restarts the stream from round 0."""
        if t >= self.strategy.n:
            raise PflmError(f"DP-FTRL round {t} is beyond the {self.strategy.n} rounds the strategy was built for; "
                            "raise server.rounds in a new run")
        if self.dim is not None and dim != self.dim:
            raise ConfigError(f"DP-FTRL release length changed from {self.dim} to {dim}: the correlated noise needs "
                              "a fixed release vector (peu.mode=all or topk)")
        if t < self.next_round:
            self.reset()
        self.dim = dim
        while self.next_round < t:
            self._step(self.next_round, dim)
            self.next_round += 1
        y = self._step(t, dim)
        self.next_round = t + 1
        return y

    def memory_bytes(self, dim: int) -> int:
        """Bytes this stream holds between rounds plus one round's draw (float64)."""
        s = self.strategy
        held = len(s.theta) if s.kind == "blt" else (max(s.bands - 1, 0) if s.kind == "banded_mf" else 0)
        return 8 * dim * (held + (2 if s.kind != "tree" else 3))


class CorrelatedNoisePostprocessor(Postprocessor):
    """Server side: add σ·C_t·(m̄/M)·(C⁻¹z)_t to the sum of round t (same scaling as the Gaussian mechanism)."""

    def __init__(self, strategy: Strategy, noise_multiplier: float, generator: SecureRandom, expected_cohort: int,
                 noise_cohort: int | None = None) -> None:
        if not noise_multiplier >= 0 or math.isinf(noise_multiplier):
            raise ConfigError(f"noise_multiplier={noise_multiplier} is invalid: use a finite σ ≥ 0")
        self.stream = CorrelatedNoise(strategy, generator)
        self.noise_multiplier = float(noise_multiplier)
        self.expected_cohort = int(expected_cohort)
        self.noise_cohort = int(noise_cohort or expected_cohort)
        self._row_norms = strategy.row_norms()

    def scale(self, clip_bound: float) -> float:
        return self.noise_multiplier * float(clip_bound) * self.expected_cohort / self.noise_cohort

    def on_server(self, agg: AggregateResult, ctx: RoundContext) -> tuple[AggregateResult, dict[str, float]]:
        if self.noise_multiplier == 0:
            return agg, {"noise_std_sum": 0.0, "noise_std_mean": 0.0}
        if math.isinf(ctx.clip_bound):
            raise ConfigError("DP-FTRL noise needs a finite clip bound: set privacy.clip_bound")
        scale = self.scale(ctx.clip_bound)
        y = self.stream.noise(ctx.round, agg.total.numel())
        total = (agg.total.to(torch.float64) + y.view(agg.total.shape) * scale).to(agg.total.dtype)
        std = scale * float(self._row_norms[ctx.round])  # marginal std of this round's noise (public)
        return replace(agg, total=total), {
            "noise_std_sum": std,
            "noise_std_mean": std / self.expected_cohort,
            "noise_norm_mean": std / self.expected_cohort * math.sqrt(agg.total.numel()),
        }

    def state_dict(self) -> dict[str, Any]:
        return {}  # the stream is re-derived from the key (see module docstring)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.stream.reset()


def empirical_covariance(strategy: Strategy, generator: SecureRandom, trials: int) -> np.ndarray:
    """n×n covariance of the stream over `trials` independent coordinates (tests: compare with C⁻¹C⁻ᵀ)."""
    stream = CorrelatedNoise(strategy, generator)
    ys = np.stack([stream.noise(t, trials).numpy() for t in range(strategy.n)])
    return ys @ ys.T / trials
