"""Losses: exact full softmax, statistical checks of sampled-softmax and NCE gradients, evaluation helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pflm.errors import ConfigError
from pflm.model.options import ModelConfig
from pflm.model.factory import build_model
from pflm.model.losses import (LossConfig, UnigramSampler, compute_loss, full_softmax_loss, nce_loss,
                               sampled_softmax_loss, sequence_logprobs, token_count, token_nll)

V, H = 20, 6


def toy_batch(seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 3, H, generator=g)
    w = 0.5 * torch.randn(V, H, generator=g)
    b = 0.3 * torch.randn(V, generator=g)
    targets = torch.randint(0, V, (2, 3), generator=g)
    mask = torch.ones(2, 3, dtype=torch.bool)
    mask[1, 2] = False
    return h, w, b, targets, mask


def flat_grad(loss_fn, h: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    loss_fn(hh, ww, bb).sum().backward()
    return torch.cat([hh.grad.flatten(), ww.grad.flatten(), bb.grad.flatten()])  # type: ignore[union-attr]


def mc_gradient(loss_fn, h, w, b, draws: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error of the gradient over `draws` independent noise samples."""
    gs = torch.stack([flat_grad(loss_fn, h, w, b) for _ in range(draws)])
    return gs.mean(0), gs.std(0) / draws ** 0.5


def test_full_softmax_loss_is_per_sequence_mean_cross_entropy() -> None:
    h, w, b, t, m = toy_batch()
    m[0] = False  # a sequence with no valid target gets loss 0, not NaN
    loss = full_softmax_loss(h, w, b, t, m)
    ce = F.cross_entropy((h @ w.T + b).reshape(-1, V), t.reshape(-1), reduction="none").view(2, 3)
    assert loss.shape == (2,)
    assert loss[0].item() == 0.0
    assert torch.allclose(loss[1], ce[1, :2].mean())
    assert token_count(m) == 2


class WrongLogQ(UnigramSampler):
    """Samples from q but claims q is uniform: the logQ correction is then wrong (negative control)."""

    def log_q(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.full(ids.shape, -float(np.log(self.vocab_size)))


def test_sampled_softmax_gradient_matches_full_softmax_in_expectation() -> None:
    h, w, b, t, m = toy_batch(1)
    g_full = flat_grad(lambda hh, ww, bb: full_softmax_loss(hh, ww, bb, t, m), h, w, b)
    counts = np.arange(1, V + 1, dtype=float) ** 2  # skewed noise: q ranges over ~ 50x
    gen = torch.Generator().manual_seed(0)
    sampler = UnigramSampler(counts, alpha=0.75)
    k, draws = 2000, 200  # k >> V: the finite-k bias (log of an unbiased Z estimate) is ~0.1% here

    def loss(smp: UnigramSampler):
        return lambda hh, ww, bb: sampled_softmax_loss(hh, ww, bb, t, m, smp, k, gen)

    mean, se = mc_gradient(loss(sampler), h, w, b, draws)
    # Per-coordinate z-scores against the exact gradient, plus an absolute allowance for the O(1/k) bias.
    z = (mean - g_full).abs() / (se + 0.002 * g_full.abs().max())
    assert z.max() < 5, f"max z = {z.max():.2f}"
    assert (mean - g_full).norm() / g_full.norm() < 0.03  # MC noise + finite-k bias; wrong logQ gives > 0.1
    # Negative control: the same test fails without the right logQ correction.
    wrong, _ = mc_gradient(loss(WrongLogQ(counts, alpha=0.75)), h, w, b, 20)
    assert (wrong - g_full).norm() / g_full.norm() > 0.1


def nce_expected_gradient(h, w, b, t, m, q: torch.Tensor, k: int, log_z: float) -> torch.Tensor:
    """Exact expectation over noise of the NCE gradient: d/ds(w) = -[w=t] k q_t/(p_t + k q_t) + k q_w p_w/(p_w + k q_w)
    with p = exp(s - log Z); chained to h, W, b through a detached-coefficient surrogate."""
    hh, ww, bb = (x.clone().requires_grad_() for x in (h, w, b))
    s = hh @ ww.T + bb  # [B,T,V]
    with torch.no_grad():
        p = torch.exp(s - log_z)
        kq = k * q
        coef = kq * p / (p + kq) - F.one_hot(t, V) * (kq / (p + kq))
        coef = coef * (m.float() / m.sum(1, keepdim=True).clamp(min=1)).unsqueeze(-1)
    (coef * s).sum().backward()
    return torch.cat([hh.grad.flatten(), ww.grad.flatten(), bb.grad.flatten()])  # type: ignore[union-attr]


def test_nce_gradient_matches_its_analytic_expectation() -> None:
    h, w, b, t, m = toy_batch(2)
    counts = np.arange(1, V + 1, dtype=float)
    sampler = UnigramSampler(counts, alpha=0.75)
    k, log_z, draws = 50, 0.5, 400
    gen = torch.Generator().manual_seed(3)
    mean, se = mc_gradient(lambda hh, ww, bb: nce_loss(hh, ww, bb, t, m, sampler, k, gen, log_z=log_z),
                           h, w, b, draws)
    expected = nce_expected_gradient(h, w, b, t, m, sampler.probs, k, log_z)
    z = (mean - expected).abs() / (se + 1e-6)
    assert z.max() < 5.5, f"max z = {z.max():.2f}"
    # The expectation depends on log Z: a different constant is clearly rejected by the same test.
    other = nce_expected_gradient(h, w, b, t, m, sampler.probs, k, log_z + 1.0)
    assert ((mean - other).abs() / (se + 1e-6)).max() > 10


@pytest.mark.parametrize("normalised", [True, False])
def test_nce_expected_gradient_equals_full_softmax_for_a_normalised_model(normalised: bool) -> None:
    """Theory: with sum_w exp(s_w) = 1 (log Z = 0) and k q >> p, E[NCE grad] = full-softmax grad."""
    h, w, b, t, _ = toy_batch(4)
    h, t = h[:1, :1], t[:1, :1]
    m = torch.ones(1, 1, dtype=torch.bool)
    b = b - torch.logsumexp(h[0, 0] @ w.T + b, dim=0)  # normalise this context
    if not normalised:
        b = b + 1.5
    q = UnigramSampler(np.arange(1, V + 1, dtype=float), alpha=0.75).probs
    g_full = flat_grad(lambda hh, ww, bb: full_softmax_loss(hh, ww, bb, t, m), h, w, b)
    g_nce = nce_expected_gradient(h, w, b, t, m, q, 20000, 0.0)
    rel = ((g_nce - g_full).norm() / g_full.norm()).item()
    if normalised:
        assert rel < 0.01
    else:
        assert rel > 0.5


def test_sampled_losses_touch_only_gathered_rows() -> None:
    h, w, b, t, m = toy_batch(5)
    sampler = UnigramSampler(np.ones(V))
    for fn in (sampled_softmax_loss, nce_loss):
        gen = torch.Generator().manual_seed(9)
        noise = sampler.sample(3, generator=torch.Generator().manual_seed(9))
        ww, bb = w.clone().requires_grad_(), b.clone().requires_grad_()
        fn(h, ww, bb, t, m, sampler, 3, gen).sum().backward()
        used = set(noise.tolist()) | set(t[m].tolist())
        untouched = [i for i in range(V) if i not in used]
        assert untouched and ww.grad[untouched].abs().sum() == 0 and bb.grad[untouched].abs().sum() == 0
        assert ww.grad[sorted(used)].abs().sum() > 0


def test_unigram_sampler_distribution_and_exclusions() -> None:
    counts = np.array([0, 1, 4, 9, 16, 0], dtype=float)
    s = UnigramSampler(counts, alpha=0.5, exclude=[0])
    expected = np.array([0, 1, 2, 3, 4, 1], dtype=float)  # counts clipped at min_count=1 before the power
    assert np.allclose(s.probs.numpy(), expected / expected.sum(), atol=1e-6)
    draws = s.sample(200_000, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / draws.numel()
    assert freq[0] == 0
    assert torch.allclose(freq, s.probs.double(), atol=0.005)
    assert torch.allclose(s.log_q(torch.tensor([2, 4])), torch.log(s.probs[[2, 4]]))
    with pytest.raises(ConfigError):
        UnigramSampler(np.array([-1.0, 2.0]))
    with pytest.raises(ConfigError):
        UnigramSampler(np.array([1.0, 2.0]), exclude=[0, 1])


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_evaluation_helpers_are_exact_and_chunked(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, embedding_dim=8, hidden_dim=8, num_heads=2, ff_dim=8, max_len=12),
                        V).eval()
    tokens = torch.randint(1, V, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[2, 6:] = False
    with torch.no_grad():
        lp = torch.log_softmax(model(tokens[:, :-1]), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)
        manual = (lp * mask[:, 1:]).sum(1)
        full = sequence_logprobs(model, tokens, mask)
        chunked = sequence_logprobs(model, tokens, mask, max_logits=3 * V * 2)  # 2 time steps per chunk
        nll = token_nll(model, tokens[:, :-1], tokens[:, 1:], mask[:, 1:], max_logits=1)
    assert torch.allclose(full, manual, atol=1e-5) and torch.allclose(chunked, manual, atol=1e-5)
    assert torch.allclose(-nll.sum(1), manual, atol=1e-5) and (nll[2, 5:] == 0).all()


def test_compute_loss_dispatch_and_config() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(embedding_dim=8, hidden_dim=8), V)
    x, y = torch.randint(0, V, (2, 5)), torch.randint(0, V, (2, 5))
    m = torch.ones(2, 5, dtype=torch.bool)
    full = compute_loss(model, x, y, m, LossConfig(kind="full"))
    ref = full_softmax_loss(model.features(x), model.output_weight(), model.output_bias(), y, m)
    assert torch.allclose(full, ref, atol=1e-6)
    sampler = UnigramSampler(np.ones(V))
    for kind in ("sampled", "nce"):
        loss = compute_loss(model, x, y, m, LossConfig(kind=kind, num_samples=7), sampler)
        assert loss.shape == (2,) and torch.isfinite(loss).all()
    with pytest.raises(ConfigError, match="UnigramSampler"):
        compute_loss(model, x, y, m, LossConfig(kind="nce"))
    from opacus import GradSampleModule
    gsm = GradSampleModule(build_model(ModelConfig(embedding_dim=8, hidden_dim=8), V, dp_compatible=True))
    with pytest.raises(ConfigError, match="Opacus"):
        compute_loss(gsm, x, y, m, LossConfig(kind="sampled"), sampler)
    assert compute_loss(gsm, x, y, m, LossConfig(kind="full")).shape == (2,)
    gsm._close()
    for bad in (dict(kind="hinge"), dict(num_samples=0), dict(unigram_alpha=2.0)):
        with pytest.raises(ConfigError):
            LossConfig(**bad)  # type: ignore[arg-type]
