"""The analytic per-token training FLOPs (pflm.model.flops) equal torch's FlopCounterMode on one training batch."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from pflm.errors import ConfigError
from pflm.model.options import ModelConfig
from pflm.model.factory import build_model
from pflm.model.flops import lstm_layer_flops, training_flops_per_token


@pytest.mark.parametrize("layers,tied", [(1, False), (2, False), (1, True)])
def test_analytic_flops_match_flop_counter(layers, tied):
    """One floor-style step (embedding -> LSTM -> output on the valid positions, cross entropy, backward) on
    unpadded sentences. FlopCounterMode sees the matrix products of the unfused LSTM (mkldnn off); the only
    difference to the per-token count is the recurrent input gradient of step 0, whose input (the zero initial
    state) needs none: 2 * 4H * H FLOPs per sentence and layer."""
    cfg = ModelConfig(embedding_dim=16, hidden_dim=24, num_layers=layers, tie_embeddings=tied)
    v, b, t = 50, 3, 7
    model = build_model(cfg, v)
    x, y = torch.randint(0, v, (b, t)), torch.randint(0, v, (b, t))
    mask = torch.ones(b, t, dtype=torch.bool)
    with torch.backends.mkldnn.flags(enabled=False), FlopCounterMode(display=False) as counter:
        feats = model.features(x)
        loss = F.cross_entropy(F.linear(feats[mask], model.output_weight(), model.output_bias()), y[mask])
        loss.backward()
    h = cfg.hidden_dim
    expected = training_flops_per_token(cfg, v) * b * t - layers * b * 2 * 4 * h * h
    assert counter.get_total_flops() == expected
    names = [x.name for x in lstm_layer_flops(cfg, v)]
    assert ("proj.weight" in names) == tied and names[-1] == "output.weight"


def test_issue_workload_and_refusals():
    """The issue-10 model (10k vocab, LSTM 128/256 untied): 6 x (4H(E+H) + H V) = 17.72 MFLOP per token."""
    cfg = ModelConfig(embedding_dim=128, hidden_dim=256)
    assert training_flops_per_token(cfg, 10_000) == 6 * (4 * 256 * (128 + 256) + 256 * 10_000)
    frozen = training_flops_per_token(cfg, 10_000, train_embeddings=False)
    assert training_flops_per_token(cfg, 10_000) - frozen == 2 * 128 * 4 * 256
    with pytest.raises(ConfigError, match="lstm only"):
        training_flops_per_token(ModelConfig(arch="transformer"), 100)
