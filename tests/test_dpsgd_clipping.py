"""Device DP-SGD: per-sample gradients match the trainer's own loss, clipped contributions stay <= max_grad_norm."""

from __future__ import annotations

import pytest
import torch

from pflm.config import load_recipe
from pflm.device.batching import pack_sentences
from pflm.errors import ConfigError
from pflm.secure_random import new_key
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"
CLIP = 0.05


def make_sim(data: str, tmp_path, **extra) -> Simulator:
    base = {"dpsgd.enabled": "true", "dpsgd.noise_multiplier": 0.0, "dpsgd.max_grad_norm": CLIP,
            "device.num_samples": 16}
    base.update(extra)
    return Simulator(load_recipe(RECIPE, tiny_overrides(data, str(tmp_path), **base)))


def _batch(sim: Simulator, n: int = 6):
    plan = sim.server.plan_round(0)
    tr = sim.fanout.trainer
    tr.load_round(0, plan.device_state, plan.rows)
    tr.model.train()
    user = max(plan.cohort, key=lambda u: len(sim.fd.user_tokens("train", u)))
    seqs, lengths = pack_sentences(sim.fd.user_tokens("train", user)[:n], sim.cfg.data.max_tokens)
    return tr.local_vocab.batch(seqs, lengths)


def _reference(sim: Simulator, inputs, targets, mask):
    """Per-sentence losses of the whole batch and per-sentence gradients (one sentence at a time), computed with
    the trainer's own `_loss` (functional output layer, plain autograd) and the same noise words (same seed)."""
    tr, dp = sim.fanout.trainer, sim.fanout.trainer.dpsgd
    hooked = hasattr(dp.gsm, "disable_hooks")  # ew mode has no hooks: per-sample grads only inside gsm(...)
    if hooked:
        dp.gsm.disable_hooks()
    try:
        with torch.no_grad():
            losses = tr._loss(inputs, targets, mask, torch.Generator().manual_seed(7))
        grads = []
        for i in range(inputs.shape[0]):
            li = tr._loss(inputs[i:i + 1], targets[i:i + 1], mask[i:i + 1], torch.Generator().manual_seed(7))
            grads.append(torch.autograd.grad(li.sum(), tr.trainable))
    finally:
        if hooked:
            dp.gsm.enable_hooks()
    return losses, grads


@pytest.mark.parametrize("mode,loss,tied,arch", [
    ("hooks", "full", False, "lstm"), ("hooks", "sampled_softmax", False, "lstm"), ("hooks", "nce", False, "lstm"),
    ("hooks", "full", True, "lstm"), ("hooks", "nce", True, "lstm"),
    ("ghost", "full", False, "lstm"), ("ghost", "sampled_softmax", False, "lstm"), ("ghost", "nce", False, "lstm"),
    ("functorch", "full", False, "lstm"), ("ew", "full", False, "lstm"),
    ("ghost", "nce", False, "transformer"), ("hooks", "sampled_softmax", True, "transformer"),
])
def test_per_sample_grads_exact_and_clipped(synthetic_data, tmp_path, mode, loss, tied, arch):
    sim = make_sim(synthetic_data, tmp_path, **{"dpsgd.grad_sample_mode": mode, "device.loss": loss,
                                                "model.tie_embeddings": str(tied).lower(), "model.arch": arch,
                                                "model.num_layers": 1})
    tr, dp = sim.fanout.trainer, sim.fanout.trainer.dpsgd
    inputs, targets, mask = _batch(sim)
    ref_losses, ref_grads = _reference(sim, inputs, targets, mask)
    b = inputs.shape[0]
    ref_flat = torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in ref_grads])  # [B, P]
    ref_norms = ref_flat.norm(dim=1)
    assert bool((ref_norms > CLIP).any()), "the clip bound must bind for this test to mean anything"
    expected_bs = 4.5
    dp._reset(expected_bs / b, b, new_key())
    noise = dp._noise_words(torch.Generator().manual_seed(7))
    per_seq = dp.gsm(inputs, targets, mask, noise)
    torch.testing.assert_close(per_seq.detach(), ref_losses, rtol=1e-5, atol=1e-6)
    factors = (CLIP / (ref_norms + 1e-6)).clamp(max=1.0)
    want = (factors.unsqueeze(1) * ref_flat).sum(0) / expected_bs
    if mode == "ghost":
        from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

        DPTensorFastGradientClipping(dp.gsm, dp.optimizer, per_seq, "mean").backward()
        torch.testing.assert_close(dp.gsm.per_sample_gradient_norms, ref_norms, rtol=1e-4, atol=1e-6)
    else:
        per_seq.mean().backward()
        gs = dp.optimizer.grad_samples  # every trainable parameter has a per-sample gradient (output layer too)
        assert len(gs) == len(tr.trainable)
        flat = torch.cat([g.reshape(b, -1) for g in gs], dim=1)
        torch.testing.assert_close(flat, ref_flat, rtol=1e-4, atol=1e-6)
        # Opacus' clip factors applied to its grad samples: every clipped contribution is within the bound.
        norms = flat.norm(dim=1)
        clipped = (CLIP / (norms + 1e-6)).clamp(max=1.0).unsqueeze(1) * flat
        assert float(clipped.norm(dim=1).max()) <= CLIP * (1 + 1e-5)
        assert bool((norms > CLIP).any())
    assert dp.optimizer.pre_step()  # clip (hooks) + noise (σ = 0) + divide by the expected batch size
    got = torch.cat([p.grad.reshape(-1) for p in tr.trainable])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert float(got.norm()) * expected_bs <= b * CLIP * (1 + 1e-5)
    dp.optimizer.zero_grad(set_to_none=True)


def test_empty_poisson_batch_is_a_noise_only_step(synthetic_data, tmp_path):
    sim = make_sim(synthetic_data, tmp_path, **{"dpsgd.noise_multiplier": 2.0, "dpsgd.max_grad_norm": 0.5,
                                                "device.lr": 1.0})
    _batch(sim)
    tr, dp = sim.fanout.trainer, sim.fanout.trainer.dpsgd
    before = [p.detach().clone() for p in tr.trainable]
    dp._reset(0.25, 40, new_key())  # expected batch size 10
    dp._empty_step()
    delta = torch.cat([(p.detach() - p0).reshape(-1) for p, p0 in zip(tr.trainable, before)])
    assert delta.numel() > 20_000
    # SGD lr 1: delta = -noise / E with noise ~ N(0, (σ C)^2) per coordinate
    assert float(delta.std()) == pytest.approx(2.0 * 0.5 / 10.0, rel=0.05)
    assert abs(float(delta.mean())) < 0.01


def test_training_reports_empty_batches(synthetic_data, tmp_path):
    sim = make_sim(synthetic_data, tmp_path, **{"dpsgd.sample_rate": 0.02, "dpsgd.noise_multiplier": 1.0})
    plan = sim.server.plan_round(0)
    sim.fanout.trainer.load_round(0, plan.device_state, plan.rows)
    user = min(plan.cohort, key=lambda u: len(sim.fd.user_tokens("train", u)))
    res = sim.fanout.trainer.train(user, sim.fd.user_tokens("train", user), new_key())
    assert res.metrics["device_dp_steps"] == 50 and res.metrics["local_steps"] == 50
    assert 0 < res.metrics["device_dp_empty_batches"] < 50
    assert torch.isfinite(res.update).all() and float(res.update.norm()) > 0


def test_ghost_with_tied_embeddings_is_a_config_error(synthetic_data, tmp_path):
    with pytest.raises(ConfigError, match="tie_embeddings=false or dpsgd.grad_sample_mode=hooks"):
        make_sim(synthetic_data, tmp_path, **{"dpsgd.grad_sample_mode": "ghost", "model.tie_embeddings": "true"})


def test_functorch_with_sampled_loss_is_a_config_error(synthetic_data, tmp_path):
    with pytest.raises(ConfigError, match="use grad_sample_mode=hooks or ghost"):
        make_sim(synthetic_data, tmp_path, **{"dpsgd.grad_sample_mode": "functorch", "device.loss": "nce"})
