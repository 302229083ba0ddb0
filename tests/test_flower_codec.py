"""Flower wire format and node-side device code without Ray or sockets: exact round trips, partitions, caching."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Context, RecordDict

from pflm.config import load_recipe
from pflm.errors import PflmError
from pflm.flower import codec, shards
from pflm.flower.device import node_state, train_users
from pflm.secure_random import subkey
from pflm.device.update import device_update
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"


def _ctx(**node_config) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_partition_from_node_config():
    assert shards.node_partition(_ctx(**{"partition-id": 2, "num-partitions": 3})) == (2, 3)
    with pytest.raises(PflmError, match="--node-config"):
        shards.node_partition(_ctx())
    with pytest.raises(PflmError, match="outside"):
        shards.node_partition(_ctx(**{"partition-id": 3, "num-partitions": 3}))
    rd = shards.encode_partition(1, 4)
    assert shards.decode_partition(rd) == (1, 4)


def test_plan_and_reply_round_trip_exactly(synthetic_data, tmp_path):
    cfg = load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path), **{"peu.mode": "sampled", "peu.k": 40}))
    sim = Simulator(cfg)
    plan = sim.server.plan_round(1)
    users = plan.cohort[:3]
    task = codec.decode_train(codec.encode_train(plan, users, codec.recipe_payload(cfg), sim.population, 1))
    assert task.users == users and task.population == sim.population
    assert task.ctx.cohort == users  # a node never learns who else was sampled
    assert (task.ctx.round, task.ctx.dim, task.ctx.clip_bound) == (plan.ctx.round, plan.ctx.dim, plan.ctx.clip_bound)
    assert torch.equal(task.rows, plan.rows)
    assert task.device_state.keys() == plan.device_state.keys()
    for k, v in plan.device_state.items():
        assert torch.equal(task.device_state[k], v), k
    assert codec.recipe_from_payload(task.recipe_json).device == cfg.device

    # the node-side code gives the same clipped vectors as the in-process loop
    st = node_state(task.recipe_json, task.population)
    assert node_state(task.recipe_json, task.population) is st  # one trainer per process and recipe
    reply = codec.decode_reply(codec.encode_reply(train_users(st, task, None)))
    sim.fanout.trainer.load_round(1, plan.device_state, plan.rows)
    assert [d.user for d in reply.devices] == users and reply.nonfinite == []
    for d in reply.devices:
        key = subkey(sim.run_key, "device", 1, d.user)  # reproducible mode: the node derives the same key
        res, vec, aux = device_update(sim.fanout.trainer, sim.server.postprocessors, plan.ctx, d.user, sim.fd.user_tokens("train", d.user), key)
        assert torch.equal(d.update, vec)
        assert d.weight == res.weight and d.num_tokens == res.num_tokens and d.aux == aux
        assert d.update.numel() == plan.ctx.dim

    with pytest.raises(PflmError, match="do not belong"):
        train_users(st, task, (0, 1000))


def test_empty_reply_round_trips():
    reply = codec.decode_reply(codec.encode_reply(codec.NodeReply([], [5, 9])))
    assert reply.devices == [] and reply.nonfinite == [5, 9]
