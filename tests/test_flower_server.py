"""The Flower fan-out (FlowerNodes) without Ray or sockets: a loop-back Grid calls the real ClientApp in-process.

Covers what the Ray/loopback tests cannot provoke cheaply: node failures drop exactly that node's users,
stray answers are ignored, a round with no survivor leaves the model untouched, and bad partition setups fail
with a clear message.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from flwr.app import Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from pflm.config import load_recipe
from pflm.errors import PflmError
from pflm.flower import codec
from pflm.flower.client_app import app as client_app
from pflm.flower.policy import POLICY_ENV, write_node_policy
from pflm.flower.server_app import flower_driver
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Flower stamps new messages with the process's task identity, which its runtime normally sets."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class LoopGrid:
    """The part of `flwr.serverapp.Grid` FlowerNodes uses; replies are computed at push time."""

    def __init__(self, partitions: list[int], num_partitions: int, fail: set[int] = frozenset(), tamper=None) -> None:
        self.nodes = {
            100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                             node_config={"partition-id": p, "num-partitions": num_partitions})
            for i, p in enumerate(partitions)
        }
        self.fail, self.tamper = fail, tamper
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages) -> list[str]:
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # what Flower's grids do on push
            node = m.metadata.dst_node_id
            ctx = self.nodes[node]
            if m.metadata.message_type == "train" and ctx.node_config["partition-id"] in self.fail:
                rep = Message(Error(code=0, reason="simulated crash"), reply_to=m)
            else:
                rep = client_app(m, ctx)
                if self.tamper and m.metadata.message_type == "train":
                    rep = self.tamper(rep, m)
            rep.metadata.__dict__["_src_node_id"] = node
            self.replies[m.metadata.message_id] = rep
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


@pytest.fixture(autouse=True)
def node_policy_file(tmp_path, monkeypatch):
    """The loop-grid nodes' trusted policy file ($PFLM_NODE_POLICY); `_cfg` writes the recipe's into it (the test
    plays every node's owner, as `pflm train backend=flower` does for its simulated nodes)."""
    path = tmp_path / "node_policy.json"
    monkeypatch.setenv(POLICY_ENV, str(path))
    return path


def _cfg(data, tmp_path, **extra):
    base = {"server.rounds": 2, "server.cohort_size": 8, "flower.num_supernodes": 3, "backend": "flower",
            "server.sampling": "fixed"}
    base.update(extra)
    cfg = load_recipe(RECIPE, tiny_overrides(data, str(tmp_path), **base))
    write_node_policy(cfg, os.environ[POLICY_ENV])
    return cfg


def _metrics(cfg) -> list[dict]:
    return [json.loads(x) for x in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loop_grid_matches_inprocess(synthetic_data, tmp_path):
    extra = {"device.loss": "sampled_softmax", "device.num_samples": 32}  # noise words: per-(round, user) RNG
    cfg = _cfg(synthetic_data, tmp_path / "fl", **extra)
    flower_driver(cfg, LoopGrid([0, 1, 2], 3)).run(progress=False)
    extra.update({"server.rounds": 2, "server.cohort_size": 8, "server.sampling": "fixed"})
    ref = load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "ip"), **extra))
    Simulator(ref).run(progress=False)
    a, b = load_file(str(cfg.run_dir / "model.safetensors")), load_file(str(ref.run_dir / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_failed_node_drops_only_its_users(synthetic_data, tmp_path):
    cfg = _cfg(synthetic_data, tmp_path)
    sim = flower_driver(cfg, LoopGrid([0, 1, 2], 3, fail={1}))
    sim.run(progress=False)
    for m in _metrics(cfg):
        cohort = sim.server.plan_round(m["round"]).cohort
        lost = sum(1 for u in cohort if u % 3 == 1)
        assert m.get("node_dropped", 0) == lost
        assert m["contributors"] == len(cohort) - lost


def test_all_nodes_failing_leaves_model_untouched(synthetic_data, tmp_path):
    cfg = _cfg(synthetic_data, tmp_path, **{"server.rounds": 1})
    sim = flower_driver(cfg, LoopGrid([0, 1, 2], 3, fail={0, 1, 2}))
    before = {k: v.clone() for k, v in sim.server.model.state_dict().items()}
    m = sim.run_round(0)
    assert "failed" in m and m["node_dropped"] == 8
    assert sim.server.rounds_done == 0
    for k, v in sim.server.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_stray_answers_are_ignored(synthetic_data, tmp_path):
    def tamper(rep: Message, sent: Message) -> Message:  # a node also "answers" for user 10**6
        reply = codec.decode_reply(rep.content)
        reply.devices.append(codec.DeviceReply(10**6, torch.full((reply.devices[0].update.numel(),), 1e3), 1.0, 5, 1.0, 0.0, {"clipped": 0.0}))
        return Message(codec.encode_reply(reply), reply_to=sent)

    cfg = _cfg(synthetic_data, tmp_path, **{"server.rounds": 1})
    sim = flower_driver(cfg, LoopGrid([0, 1, 2], 3, tamper=tamper))
    m = sim.run_round(0)
    assert m["contributors"] == 8 and m["update_norm"] < 10


def test_partition_setup_errors(synthetic_data, tmp_path):
    cfg = _cfg(synthetic_data, tmp_path)
    with pytest.raises(PflmError, match="claim partition-id=0"):
        flower_driver(cfg, LoopGrid([0, 0, 1], 3)).fanout.discover()
    two = _cfg(synthetic_data, tmp_path, **{"flower.num_supernodes": 2})
    with pytest.raises(PflmError, match=r"partition\(s\) \[2\]"):
        flower_driver(two, LoopGrid([0, 1], 3)).fanout.discover()
    with pytest.raises(PflmError, match="only 2 of flower.num_supernodes=3"):
        flower_driver(cfg, LoopGrid([0, 1], 2), node_wait=0.3).fanout.discover()


def test_secure_aggregation_through_flower_matches_inprocess(synthetic_data, tmp_path):
    extra = {"server.rounds": 1, "server.cohort_size": 6, "aggregation.kind": "secure", "server.sampling": "fixed"}
    cfg = _cfg(synthetic_data, tmp_path / "fl", **extra)
    flower_driver(cfg, LoopGrid([0, 1, 2], 3)).run(progress=False)
    extra.pop("flower.num_supernodes", None)
    ref = load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "ip"), **extra))
    Simulator(ref).run(progress=False)
    a, b = load_file(str(cfg.run_dir / "model.safetensors")), load_file(str(ref.run_dir / "model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert _metrics(cfg)[0]["contributors"] == 6
