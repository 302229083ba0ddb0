"""PEU row choice, LoRA release layout and server-side adapter folding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pflm.config import PEUConfig, load_recipe
from pflm.model.options import LoraConfig, ModelConfig
from pflm.model.factory import build_model
from pflm.model.lora import expected_lora_parameter_count
from pflm.server.lora_refresh import fold_and_restart
from pflm.server.peu import RowSelector
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"


def test_topk_uses_prior_and_keeps_specials():
    prior = np.zeros(100)
    prior[[50, 60, 70]] = [5, 9, 7]
    rows = RowSelector(PEUConfig(mode="topk", k=8), 100, prior, seed=0).select(3)
    assert rows.tolist()[:4] == [0, 1, 2, 3]
    assert {50, 60, 70} <= set(rows.tolist()) and len(rows) == 8


def test_sampled_rows_depend_only_on_seed_and_round():
    sel = RowSelector(PEUConfig(mode="sampled", k=20, prior="uniform"), 1000, None, seed=5)
    a, b = sel.select(7), sel.select(7)
    assert torch.equal(a, b) and not torch.equal(a, sel.select(8))
    assert len(set(a.tolist())) == 20


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
def test_fold_and_restart_keeps_the_function(arch):
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, embedding_dim=16, hidden_dim=32, num_heads=2, ff_dim=32,
                      lora=LoraConfig(rank=4, targets=["rnn", "attn", "ffn"]))
    model = build_model(cfg, 50)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # a trained adapter
    x = torch.randint(0, 50, (3, 7))
    before = model(x)
    n = fold_and_restart(model, seed=1, round_idx=4)
    assert n > 0
    assert torch.allclose(model(x), before, atol=1e-5)
    assert all(float(p.detach().abs().sum()) == 0 for name, p in model.named_parameters() if "lora_B" in name)


def test_lora_peu_release_contains_only_adapters_and_selected_rows(synthetic_data, tmp_path):
    k, rank = 32, 4
    sim = Simulator(load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path), **{
        "peu.mode": "topk", "peu.k": k, "model.lora.rank": rank, "model.lora.targets": "rnn",
        "server.rounds": 1, "privacy.noise_multiplier": 0.5})))
    e, h = 16, 32
    expected = expected_lora_parameter_count(sim.cfg.model) + k * e + k * h + k  # adapters + emb/out/bias rows
    assert sim.server.release_dim() == expected == sim.fanout.trainer.layout.dim
    before = {n: t.clone() for n, t in sim.server.model.state_dict().items()}
    sim.run_round(0)
    after = sim.server.model.state_dict()
    for name in before:
        if "lora_" in name or name in sim.server.vocab_names:
            continue
        assert torch.equal(before[name], after[name]), f"frozen base weight {name} changed"
