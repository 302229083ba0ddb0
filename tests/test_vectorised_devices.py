"""`device.vectorize`: a group of devices trained as one batched computation gives the same updates as training
them one at a time (float tolerance), with PEU, LoRA, tied/projected heads, several layers and clipping in a whole
round; settings it cannot train are refused with one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import tiny_overrides
from pflm.config import load_recipe
from pflm.device.spec import DeviceSpec
from pflm.device.trainer import DeviceTrainer
from pflm.device.vectorized import VectorizedDevices, check_vectorizable
from pflm.errors import ConfigError
from pflm.secure_random import derive_key, subkey

VOCAB = 120


def recipe(**extra):
    over = {"model.embedding_dim": 12, "model.hidden_dim": 20, "model.tie_embeddings": "false", "model.dropout": 0.0,
            "device.batch_size": 4, "device.lr": 0.7, "device.epochs": 2, "data.max_tokens": 9,
            "data.max_sentences_per_device": 11}
    over.update(extra)
    return load_recipe(None, [f"{k}={v}" for k, v in over.items()])


def users(n: int) -> list[list[list[int]]]:
    rng = np.random.default_rng(3)  # users of 1 to 14 sentences: 1 to 3 local steps per epoch, ragged batches
    return [[list(rng.integers(4, VOCAB, size=int(k))) for k in rng.integers(1, 13, size=int(m))]
            for m in rng.integers(1, 15, size=n)]


def close(vec: torch.Tensor, seq: torch.Tensor) -> None:
    assert vec.shape == seq.shape and vec.dtype == seq.dtype == torch.float32
    assert float(seq.abs().max()) > 0
    assert float((vec - seq).abs().max()) <= 1e-5 * float(seq.abs().max()) + 1e-7


@pytest.mark.parametrize("extra, rows", [
    ({}, None),
    ({"peu.mode": "topk", "peu.k": 50}, 50),  # PEU: the device model has the 50 selected rows
    ({"model.lora.rank": 3, "model.lora.targets": "[rnn]", "device.train_embeddings": "true"}, None),
    ({"model.lora.rank": 2, "model.lora.targets": "[rnn]", "device.train_embeddings": "false",
      "model.num_layers": 2}, None),
    ({"model.tie_embeddings": "true"}, None),  # tied head + hidden->embedding projection
])
def test_group_equals_sequential_devices(extra, rows):
    cfg = recipe(**extra)
    torch.manual_seed(0)
    tr = DeviceTrainer(DeviceSpec.from_recipe(cfg, VOCAB), np.ones(VOCAB))
    if "model.lora.rank" in extra:  # non-zero adapters, so the LoRA path really changes the weights
        with torch.no_grad():
            for n, p in tr.model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    state = {k: v.detach().clone() for k, v in tr.model.state_dict().items()}
    sel = None if rows is None else torch.arange(rows) * 2  # every other global id
    tr.load_round(4, state, sel)
    data = users(7)
    keys = [subkey(derive_key(1), "device", 4, u) for u in range(7)]
    seq = [tr.train(u, s, k) for u, (s, k) in enumerate(zip(data, keys))]
    vec = VectorizedDevices(tr).train_group([(u, s, k) for u, (s, k) in enumerate(zip(data, keys))])
    assert len(vec) == 7
    assert {r.metrics["local_steps"] for r in seq} != {seq[0].metrics["local_steps"]}  # ragged step counts
    for a, b in zip(vec, seq):
        close(a.update, b.update)
        assert (a.num_tokens, a.num_sentences, a.weight) == (b.num_tokens, b.num_sentences, b.weight)
        assert a.metrics["local_steps"] == b.metrics["local_steps"]
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)


def test_refuses_what_it_cannot_train():
    for extra, word in ((({"device.loss": "nce"}), "device.loss=nce"),
                        ({"dpsgd.enabled": "true"}, "dpsgd"),
                        ({"device.optimizer": "adam"}, "SGD"),
                        ({"model.dropout": 0.1}, "dropout"),
                        ({"model.arch": "transformer"}, "model.arch=transformer")):
        with pytest.raises(ConfigError, match=word):
            check_vectorizable(DeviceSpec.from_recipe(recipe(**extra), VOCAB))
    with pytest.raises(ConfigError, match="device.vectorize must be >= 1"):
        recipe(**{"device.vectorize": 0})
    with pytest.raises(ConfigError, match="backend=flower"):
        recipe(**{"device.vectorize": 4, "backend": "flower"})


def test_round_with_clipping_matches_sequential(synthetic_data, tmp_path):
    """A whole simulated round (clipping at a bound most updates exceed, FedAvg): same model either way."""
    from pflm.simulation.simulator import Simulator

    models = []
    for g in (1, 3):
        over = tiny_overrides(synthetic_data, str(tmp_path / f"g{g}"), **{
            "device.vectorize": g, "server.cohort_size": 7, "privacy.clip_bound": 0.05, "model.dropout": 0.0,
            "server.rounds": 2, "data.max_sentences_per_device": 9})
        sim = Simulator(load_recipe("recipes/tiny_synthetic.yaml", over))
        m = [sim.run_round(r) for r in range(2)]
        assert all("failed" not in x for x in m)
        models.append({k: v.clone() for k, v in sim.server.model.state_dict().items()})
    for k in models[0]:
        torch.testing.assert_close(models[1][k], models[0][k], rtol=1e-4, atol=1e-6)
