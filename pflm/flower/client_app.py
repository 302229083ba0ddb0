"""Flower ClientApp: a SuperNode trains the users the ServerApp assigns to it with pflm's own device code.

Each SuperNode owns one data partition: training user u belongs to partition u mod num-partitions
(`partition-id` / `num-partitions` come from the node config: set automatically in simulation, given with
`--node-config` in a deployment). The ServerApp first asks every node for its partition (`query` message),
then each round sends every node one `train` message naming the cohort users it owns. The node loads the
round's device model once and, per user, runs `pflm.simulation.simulator.run_device` (local training with
`DeviceTrainer` + the device-side postprocessors, i.e. clipping) and replies with the clipped vectors.

One `DeviceTrainer` is built per process and recipe and reused for every message (`_NODE_CACHE`): Ray actors
in simulation keep it for the whole run. (A deployed SuperNode starts a fresh `flwr-clientapp` process per
message, which is why a message carries all of a node's users for a round.)
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pflm.config import RecipeConfig
from pflm.data.store import FederatedData
from pflm.device.trainer import DeviceTrainer
from pflm.errors import PflmError
from pflm.flower import codec
from pflm.privacy.base import Postprocessor
from pflm.privacy.clipping import NonFiniteUpdate
from pflm.privacy.setup import PrivacySetup
from pflm.server.server import RoundPlan
from pflm.simulation.simulator import run_device

DATA_DIR_KEY = "data-dir"  # optional node config: this node's copy of the prepared data (default: the recipe's)
THREADS_KEY = "threads"  # optional node config: torch threads (default: what the server sends)


@dataclass
class DevicePostprocessing:
    """The device-side half of the recipe's privacy chain (`run_device` only reads `.postprocessors`)."""

    postprocessors: list[Postprocessor]


@dataclass
class NodeState:
    cfg: RecipeConfig
    fd: FederatedData
    trainer: DeviceTrainer
    device_side: DevicePostprocessing


_NODE_CACHE: dict[str, NodeState] = {}


def _partition(context: Context) -> tuple[int, int]:
    nc = context.node_config
    if "partition-id" not in nc or "num-partitions" not in nc:
        raise PflmError(
            "this SuperNode has no partition; start it with --node-config 'partition-id=I num-partitions=N'"
        )
    pid, n = int(nc["partition-id"]), int(nc["num-partitions"])
    if not 0 <= pid < n:
        raise PflmError(f"partition-id={pid} is outside 0..{n - 1}; fix the SuperNode's --node-config")
    return pid, n


def node_state(recipe_json: str, population: int, data_dir: str | None = None) -> NodeState:
    """The process-wide trainer for this recipe (built on first use, then reused)."""
    key = hashlib.sha256(f"{recipe_json}\n{population}\n{data_dir}".encode()).hexdigest()
    st = _NODE_CACHE.get(key)
    if st is None:
        cfg = codec.recipe_from_payload(recipe_json)
        path = data_dir or cfg.data.dir
        if not path or not Path(path).is_dir():
            raise PflmError(f"prepared data dir {path!r} not found on this node; set --node-config 'data-dir=\"DIR\"'")
        fd = FederatedData.open(path)
        counts = fd.token_counts()
        trainer = DeviceTrainer(cfg, fd.tokenizer.vocab_size, counts)
        device_side = DevicePostprocessing(PrivacySetup(cfg, population).postprocessors)
        st = NodeState(cfg, fd, trainer, device_side)
        _NODE_CACHE.clear()  # one recipe per process at a time: free the previous run's model
        _NODE_CACHE[key] = st
    return st


def train_users(st: NodeState, task: codec.TrainTask, owned: tuple[int, int] | None) -> codec.NodeReply:
    """Run pflm's device update for each user of the task (the same calls as the in-process simulator)."""
    if owned is not None:
        pid, n = owned
        foreign = [u for u in task.users if u % n != pid]
        if foreign:
            raise PflmError(f"users {foreign[:5]} do not belong to partition {pid} of {n}")
    plan = RoundPlan(task.ctx.round, task.ctx.cohort, task.rows, task.device_state, task.ctx)
    st.trainer.load_round(task.ctx.round, task.device_state, task.rows)
    devices, nonfinite = [], []
    for user in task.users:
        t0 = time.perf_counter()
        try:
            res, vec, aux = run_device(st.trainer, st.device_side, plan, user, st.fd.user_tokens("train", user))  # type: ignore[arg-type]
        except NonFiniteUpdate:
            nonfinite.append(user)
            continue
        devices.append(
            codec.DeviceReply(user, vec, res.weight, res.num_tokens, res.train_loss, time.perf_counter() - t0, aux)
        )
    return codec.NodeReply(devices, nonfinite)


app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    pid, n = _partition(context)
    return Message(codec.encode_partition(pid, n), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    task = codec.decode_train(msg.content)
    threads = int(context.node_config.get(THREADS_KEY, task.threads) or 0)
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    data_dir = context.node_config.get(DATA_DIR_KEY)
    st = node_state(task.recipe_json, task.population, str(data_dir) if data_dir else None)
    reply = train_users(st, task, _partition(context))
    return Message(codec.encode_reply(reply), reply_to=msg)
