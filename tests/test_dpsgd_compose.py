"""Device DP-SGD composed with PEU and LoRA in the simulator; the model is wrapped by Opacus only once."""

from __future__ import annotations

import pytest
import torch

import pflm.device.dpsgd as dpsgd_mod
from pflm.config import load_recipe
from pflm.model.lora import has_lora
from pflm.secure_random import new_key
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"


def make_sim(data: str, tmp_path, **extra) -> Simulator:
    base = {"server.sampling": "fixed", "dpsgd.enabled": "true", "dpsgd.noise_multiplier": 1.0, "dpsgd.max_grad_norm": 0.5,
            "device.loss": "nce", "device.num_samples": 16, "server.rounds": 1}
    base.update(extra)
    return Simulator(load_recipe(RECIPE, tiny_overrides(data, str(tmp_path), **base)))


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_peu_rows_outside_selection_bit_identical(synthetic_data, tmp_path, mode):
    sim = make_sim(synthetic_data, tmp_path, **{"peu.mode": "topk", "peu.k": 60, "dpsgd.grad_sample_mode": mode,
                                                "privacy.noise_multiplier": 0.5, "server.sampling": "poisson"})
    assert sim.fanout.trainer.model.embedding.weight.shape[0] == 60  # the device (and Opacus) only sees K rows
    before = {k: v.clone() for k, v in sim.server.model.state_dict().items()}
    plan = sim.server.plan_round(0)
    m = sim.run_round(0)
    assert "failed" not in m and m["contributors"] == m["cohort"] > 0
    after = sim.server.model.state_dict()
    outside = torch.ones(sim.vocab_size, dtype=torch.bool)
    outside[plan.rows] = False
    assert int(outside.sum()) > 100
    for name in sim.server.vocab_names:
        assert torch.equal(before[name][outside], after[name][outside]), name
        changed = (before[name][plan.rows] != after[name][plan.rows]).reshape(plan.rows.numel(), -1).any(1)
        assert bool(changed.all()), name


@pytest.mark.parametrize("train_embeddings", [True, False])
def test_lora_dpsgd_changes_only_adapters_and_selected_rows(synthetic_data, tmp_path, train_embeddings):
    sim = make_sim(synthetic_data, tmp_path, **{"model.lora.rank": 4, "peu.mode": "topk", "peu.k": 60,
                                                "device.train_embeddings": str(train_embeddings).lower(),
                                                "dpsgd.grad_sample_mode": "hooks"})
    tr = sim.fanout.trainer
    assert has_lora(tr.model)
    plan = sim.server.plan_round(0)
    tr.load_round(0, plan.device_state, plan.rows)
    start = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n in tr.model.vocab_parameters() for n in trainable)
    assert any(n in tr.model.vocab_parameters() for n in trainable) == train_embeddings
    res = tr.train(plan.cohort[0], sim.fd.user_tokens("train", plan.cohort[0]), new_key())
    assert res.update.numel() == tr.layout.dim
    for n, p in tr.model.named_parameters():
        if n in trainable:
            # DP noise reaches every trainable coordinate (lora_B starts at zero and moves too)
            assert not torch.equal(p.detach(), start[n]), n
        else:
            assert torch.equal(p.detach(), start[n]), n  # frozen: no grad sample, no noise
            assert getattr(p, "grad_sample", None) is None and p.grad is None, n
    m = sim.run_round(0)
    assert "failed" not in m


def test_model_wrapped_once_across_devices_and_rounds(synthetic_data, tmp_path, monkeypatch):
    calls = []
    real = dpsgd_mod.prepare_module

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(dpsgd_mod, "prepare_module", counting)
    sim = make_sim(synthetic_data, tmp_path, **{"server.rounds": 2, "dpsgd.grad_sample_mode": "hooks"})
    dp = sim.fanout.trainer.dpsgd
    hooks = dp.hook_count
    assert hooks > 0 and len(calls) == 1
    counts = []
    for r in range(2):
        plan = sim.server.plan_round(r)
        sim.fanout.trainer.load_round(r, plan.device_state, plan.rows)
        for user in plan.cohort:
            res = sim.fanout.trainer.train(user, sim.fd.user_tokens("train", user), new_key())
            counts.append(dp.hook_count)
            assert res.metrics["device_dp_setup_seconds"] < 0.5
            assert getattr(sim.fanout.trainer.model, "autograd_grad_sample_hooks", None) is None  # no second wrapper
    assert counts == [hooks] * 10 and len(calls) == 1 and sim.fanout.trainer.dpsgd is dp
