"""Flower wire format and node-side device code without Ray or sockets: exact round trips, partitions, caching."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from flwr.app import Context, RecordDict

from pflm.config import load_recipe
from pflm.errors import ConfigError, PflmError
from pflm.flower import codec, shards
from pflm.device.spec import DeviceSpec
from pflm.flower.device import node_state, train_users
from pflm.flower.policy import NodePolicy, policy_from_recipe
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
    task = codec.decode_train(codec.encode_train(plan, users, 1))
    assert task.users == users
    assert task.ctx.cohort == users  # a node never learns who else was sampled
    assert (task.ctx.round, task.ctx.dim, task.ctx.clip_bound) == (plan.ctx.round, plan.ctx.dim, plan.ctx.clip_bound)
    assert torch.equal(task.rows, plan.rows)
    assert task.device_state.keys() == plan.device_state.keys()
    for k, v in plan.device_state.items():
        assert torch.equal(task.device_state[k], v), k
    assert DeviceSpec.from_json(task.spec_json) == plan.spec  # the device half of the recipe, nothing more
    assert "privacy" not in task.spec_json and str(cfg.data.dir) not in task.spec_json

    # the node-side code gives the same clipped vectors as the in-process loop
    policy = policy_from_recipe(cfg)
    st = node_state(task.spec_json, policy)
    assert node_state(task.spec_json, policy) is st  # one trainer per process and device spec
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


def test_a_server_cannot_switch_a_node_to_public_device_keys(synthetic_data, tmp_path):
    """Attack: the server marks the run reproducible so that every device key is derived from the public seed
    (it could then replay each device's DP-SGD noise). A node whose own policy does not allow it refuses."""
    cfg = load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path)))  # privacy.reproducible=true
    sim = Simulator(cfg)
    plan = sim.server.plan_round(0)
    task = codec.decode_train(codec.encode_train(plan, plan.cohort[:2], 1))
    strict = NodePolicy(data_dir=str(synthetic_data))  # the built-in policy: fresh CSPRNG keys only
    with pytest.raises(PflmError, match="does not allow"):
        train_users(node_state(task.spec_json, strict), task, None)
    # without the reproducible flag the same node trains with fresh secret keys: nobody can replay the update
    honest = dataclasses.replace(plan.spec, reproducible=False)
    task2 = codec.decode_train(codec.encode_train(plan, plan.cohort[:2], 1, honest.to_json()))
    st = node_state(task2.spec_json, strict)
    a = train_users(st, task2, None).devices
    b = train_users(st, task2, None).devices
    assert a and all(not torch.equal(x.update, y.update) for x, y in zip(a, b))


def test_node_policy_overrides_the_servers_secagg_floors(tmp_path, monkeypatch):
    """The values that protect users come from the node, whatever the server's request says."""
    from pflm.aggregator.secagg.options import SecAggConfig
    from pflm.flower.policy import POLICY_ENV, node_policy

    weak = SecAggConfig(threshold=0.51, neighbours=2, min_neighbours=2, corrupt_fraction=0.0, rounding="seeded")
    merged = NodePolicy().session_config(weak)
    assert merged.neighbours == "log" and merged.min_neighbours is None and merged.threshold == 0.6
    assert merged.rounding == "urandom" and merged.corrupt_fraction == 0.05
    assert merged.bits == weak.bits  # operational values stay the server's
    f = tmp_path / "policy.yaml"
    f.write_text("secagg: {malicious: true}\nallow_reproducible: false\n")
    monkeypatch.setenv(POLICY_ENV, str(f))
    assert node_policy({}).secagg.malicious is True
    with pytest.raises(ConfigError, match="cannot be read"):
        node_policy({"policy": str(tmp_path / "missing.yaml")})
