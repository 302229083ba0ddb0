"""Server momentum (FedAvgM): momentum 0 is FedAvg bit for bit, the step matches a hand computation, and the
model's DP-FTRL noise is exactly the linear map A_β·C⁻¹·z the docs' error table assumes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pflm.config import ServerConfig
from pflm.errors import ConfigError
from pflm.privacy.dpftrl.noise import CorrelatedNoise
from pflm.privacy.dpftrl.strategy import Strategy, make_strategy, momentum_workload
from pflm.secure_random import SecureRandom, new_key
from pflm.server.optimizer import ServerOptimizer


def _cfg(**kw) -> ServerConfig:
    return ServerConfig(optimizer="fedavg", **kw)


def _updates(g: torch.Generator, rows: torch.Tensor | None = None) -> dict:
    emb = torch.randn(3 if rows is not None else 6, 4, generator=g)
    return {"emb": (emb, rows), "w": (torch.randn(5, generator=g), None)}


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"emb": torch.randn(6, 4, generator=g), "w": torch.randn(5, generator=g)}


@pytest.mark.parametrize("sparse", [False, True])
def test_momentum_zero_is_fedavg_bit_for_bit(sparse):
    rows = torch.tensor([0, 2, 5]) if sparse else None
    a, b = _params(), _params()
    plain, zero = ServerOptimizer(_cfg(lr=0.7)), ServerOptimizer(_cfg(lr=0.7, momentum=0.0))
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    ref = _params()
    for _ in range(4):
        u = _updates(g1, rows)
        plain.step(a, u)
        zero.step(b, _updates(g2, rows))
        for name, (d, r) in u.items():  # w += lr·Δ̄ on the listed rows
            if r is None:
                ref[name] += 0.7 * d
            else:
                ref[name][r] += 0.7 * d
    for name in a:
        assert torch.equal(a[name], b[name])
        assert torch.allclose(a[name], ref[name], atol=1e-6)
    assert zero.state_tensors() == {}  # no buffers: checkpoints of FedAvg runs are unchanged


def test_momentum_matches_a_hand_computation():
    """w_3 = w_0 + lr·(Δ₁ + (βΔ₁ + Δ₂) + (β²Δ₁ + βΔ₂ + Δ₃)); a row missing from a round's Δ̄ still moves by its
    decaying buffer, and a row never released never moves."""
    lr, beta = 0.5, 0.9
    p = {"emb": torch.zeros(4, 2)}
    opt = ServerOptimizer(_cfg(lr=lr, momentum=beta))
    d1, d2, d3 = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -1.0]]), torch.tensor([[-2.0, 4.0], [1.0, 1.0]])
    opt.step(p, {"emb": (d1, torch.tensor([0]))})
    opt.step(p, {"emb": (d2, torch.tensor([0]))})
    opt.step(p, {"emb": (d3, torch.tensor([1, 0]))})  # round 3: row 1 gets d3[0], row 0 gets d3[1]
    row0 = lr * (d1[0] + (beta * d1[0] + d2[0]) + (beta**2 * d1[0] + beta * d2[0] + d3[1]))
    row1 = lr * d3[0]
    assert torch.allclose(p["emb"][0], row0) and torch.allclose(p["emb"][1], row1)
    assert torch.equal(p["emb"][2:], torch.zeros(2, 2))
    # a round without row 0: it moves by lr·β·m
    before, buf = p["emb"][0].clone(), opt.state["emb"]["buf"][0].clone()
    opt.step(p, {"emb": (torch.tensor([[5.0, 5.0]]), torch.tensor([3]))})
    assert torch.allclose(p["emb"][0] - before, lr * beta * buf)


def test_momentum_checkpoint_round_trip_continues_identically():
    g = torch.Generator().manual_seed(3)
    us = [_updates(g, torch.tensor([1, 3, 4])) for _ in range(5)]
    a, opt = _params(), ServerOptimizer(_cfg(lr=0.3, momentum=0.95))
    for u in us[:3]:
        opt.step(a, u)
    saved_params = {k: v.clone() for k, v in a.items()}
    resumed = ServerOptimizer(_cfg(lr=0.3, momentum=0.95))
    resumed.load_state_tensors({k: v.clone() for k, v in opt.state_tensors().items()}, opt.steps)
    for u in us[3:]:
        opt.step(a, u)
        resumed.step(saved_params, u)
    for name in a:
        assert torch.equal(a[name], saved_params[name])


@pytest.mark.parametrize("kind", ["blt", "banded_mf"])
def test_model_noise_under_momentum_is_the_linear_map_of_the_stream(kind):
    """DP-MF with momentum: feeding the streamed correlated noise y = C⁻¹z to FedAvgM leaves the model at exactly
    lr·A_β·C⁻¹·z (A_β the momentum workload), so the error table's A_β·C⁻¹ row norms describe the model."""
    s = (Strategy("blt", 12, 3, 4, buffers=2, omega=(0.3, 0.2), theta=(0.5, 0.9)) if kind == "blt"
         else make_strategy("banded_mf", 12, 3, 4, bands=3))
    key, dim, lr, beta = new_key(), 64, 0.4, 0.9
    stream = CorrelatedNoise(s, SecureRandom(key))
    p = {"w": torch.zeros(dim, dtype=torch.float64)}
    opt = ServerOptimizer(_cfg(lr=lr, momentum=beta))
    for t in range(s.n):
        opt.step(p, {"w": (stream.noise(t, dim).clone(), None)})
    gen = SecureRandom(key)
    z = np.stack([gen.standard_normal(t, dim, "dpftrl").numpy() for t in range(s.n)])
    expected = lr * (momentum_workload(s.n, beta) @ s.noise_matrix() @ z)[-1]
    assert np.allclose(p["w"].numpy(), expected, atol=1e-9)
    assert not np.allclose(p["w"].numpy(), lr * (np.ones(s.n) @ s.noise_matrix() @ z), atol=1e-3)  # β matters


def test_model_error_with_momentum_keeps_blts_advantage():
    """At equal ε (σ ∝ sensitivity) the model's noise std is sens·√max‖(A_β C⁻¹)_t‖²: BLT's ratio to
    independent noise stays above the prefix-sum ratio at β = 0.9 (100 rounds, b = k = 10)."""
    blt, ind = make_strategy("blt", 100, 10, 10, buffers=4), make_strategy("banded_mf", 100, 10, 10, bands=1)

    def err(s, beta):
        return s.sensitivity() * np.sqrt(s.model_error_squared(beta))

    assert np.isclose(blt.model_error_squared(0.0), blt.max_error_squared())
    assert np.isclose(ind.model_error_squared(0.9), (momentum_workload(100, 0.9)[-1] ** 2).sum())
    assert err(ind, 0.0) / err(blt, 0.0) > 2.4
    assert err(ind, 0.9) / err(blt, 0.9) > err(ind, 0.0) / err(blt, 0.0)


def test_momentum_config_is_validated():
    with pytest.raises(ConfigError, match="momentum"):
        ServerConfig(optimizer="fedavg", momentum=1.0)
    with pytest.raises(ConfigError, match="fedadam"):
        ServerConfig(optimizer="fedadam", momentum=0.9)
