"""The speed benchmark's floor trains on exactly the federated round's batches, and with one device equals it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from pflm.device.batching import pack_sentences
from pflm.simulation.simulator import Simulator

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import bench  # noqa: E402

TINY = {"model.embedding_dim": 16, "model.hidden_dim": 32, "device.batch_size": 4, "data.val_users": 3}


def _sim(data: str, out: str, **extra) -> Simulator:
    return Simulator(bench.make_recipe(data, out, 1, TINY, extra))


def test_pack_sentences_layout() -> None:
    seqs, lengths = pack_sentences([[5, 6, 7], [], [8] * 30], max_tokens=4)
    assert lengths.tolist() == [5, 2, 6]
    assert seqs.tolist() == [[2, 5, 6, 7, 3, 0], [2, 3, 0, 0, 0, 0], [2, 8, 8, 8, 8, 3]]


def test_floor_batches_are_the_trainers_batches(synthetic_data, tmp_path, monkeypatch) -> None:
    sim = _sim(synthetic_data, str(tmp_path), **{"server.cohort_size": 6, "data.max_sentences_per_device": 7,
                                                 "device.epochs": 2, "peu.mode": "topk", "peu.k": 60})
    cohort, batches = bench.cohort_batches(sim, 3)
    seen: list = []
    real = sim.fanout.trainer._batch_loss

    def record(inputs, targets, mask, gen):
        seen.append((inputs.clone(), targets.clone(), mask.clone()))
        return real(inputs, targets, mask, gen)

    monkeypatch.setattr(sim.fanout.trainer, "_batch_loss", record)
    sim.run_round(3)
    assert len(cohort) == 6 and len(seen) == len(batches) > 6
    for (a, b, c), (x, y, z) in zip(seen, batches):
        assert torch.equal(a, x) and torch.equal(b, y) and torch.equal(c, z)
    # a different round gives a different cohort or order: the batches really depend on (seed, round)
    _, other = bench.cohort_batches(sim, 4)
    assert len(other) != len(batches) or any(not torch.equal(p[0], q[0]) for p, q in zip(other, batches))


def test_one_device_round_equals_floor(synthetic_data, tmp_path) -> None:
    """Cohort of one, no clipping, FedAvg with server lr 1: the new global model is the floor's trained model."""
    sim = _sim(synthetic_data, str(tmp_path), **{"server.cohort_size": 1, "privacy.clip_bound": math.inf,
                                                 "device.lr": 0.7})
    floor = bench.Floor(sim, 1)
    _, batches = bench.cohort_batches(sim, 2)
    assert len(batches) >= 2
    before = {k: v.clone() for k, v in sim.server.model.state_dict().items()}
    floor.train(batches)
    sim.run_round(2)
    moved = 0
    for name, p in floor.model.state_dict().items():
        q = sim.server.model.state_dict()[name]
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(q, before[name]))
    assert moved == len(before)  # every tensor trained (the comparison is not between two untouched models)


def test_floor_refuses_other_recipes(synthetic_data, tmp_path) -> None:
    sim = _sim(synthetic_data, str(tmp_path), **{"device.loss": "sampled_softmax"})
    try:
        bench.Floor(sim, 1)
    except ValueError as e:
        assert "full-softmax" in str(e)
    else:
        raise AssertionError("Floor accepted a sampled-softmax recipe")
