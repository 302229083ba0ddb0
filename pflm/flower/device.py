"""The node side of a Flower round: pflm's `DeviceTrainer` + device postprocessors on the users a node owns.

One `DeviceTrainer` is built per process and recipe and reused for every message (`_NODE_CACHE`): Ray actors
keep it for the whole simulated run. Per message the round's device model is loaded once, then each user
goes through `pflm.device.update.device_update` (local training, then clipping) exactly as in the
in-process simulator.

Device randomness: each (round, user) trains with a fresh secret `new_key()` drawn on the node (a real device's
local randomness: nobody else, the server included, can replay its DP-SGD noise or batches). Only with
`privacy.reproducible=true` is the key `subkey(derive_key(seed), "device", round, user)`, i.e. derived from the
public recipe seed: reproducible, and as secret as the seed (not at all, if the recipe is public).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from pflm.config import RecipeConfig
from pflm.data.store import FederatedData
from pflm.device.trainer import DeviceTrainer
from pflm.errors import PflmError
from pflm.flower import codec
from pflm.flower.shards import owner
from pflm.device.update import device_update
from pflm.privacy.base import Postprocessor
from pflm.privacy.clipping import NonFiniteUpdate
from pflm.privacy.mechanism import device_postprocessors
from pflm.secure_random import derive_key, new_key, subkey


@dataclass
class NodeState:
    cfg: RecipeConfig
    fd: FederatedData
    trainer: DeviceTrainer
    device_steps: list[Postprocessor]  # the device-side half of the recipe's privacy chain (clipping)


_NODE_CACHE: dict[str, NodeState] = {}


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
        trainer = DeviceTrainer(cfg, fd.tokenizer.vocab_size, fd.prior_counts())  # as Simulator does
        st = NodeState(cfg, fd, trainer, device_postprocessors(cfg))
        _NODE_CACHE.clear()  # one recipe per process at a time: free the previous run's model
        _NODE_CACHE[key] = st
    return st


def device_key(cfg: RecipeConfig, round_idx: int, user: int) -> bytes:
    """The secret key of one device's local training: fresh from the OS CSPRNG, or seed-derived if reproducible."""
    if getattr(cfg.privacy, "reproducible", False):
        return subkey(derive_key(cfg.seed), "device", round_idx, user)
    return new_key()


def train_users(st: NodeState, task: codec.TrainTask, partition: tuple[int, int] | None) -> codec.NodeReply:
    """Run pflm's device update for each user of the task (the same calls as the in-process simulator)."""
    if partition is not None:
        pid, n = partition
        foreign = [u for u in task.users if owner(u, n) != pid]
        if foreign:
            raise PflmError(f"users {foreign[:5]} do not belong to partition {pid} of {n}")
    st.trainer.load_round(task.ctx.round, task.device_state, task.rows)
    devices, nonfinite = [], []
    for user in task.users:
        t0 = time.perf_counter()
        try:
            key = device_key(st.cfg, task.ctx.round, user)
            res, vec, aux = device_update(st.trainer, st.device_steps, task.ctx, user, st.fd.user_tokens("train", user), key)
        except NonFiniteUpdate:
            nonfinite.append(user)
            continue
        devices.append(codec.DeviceReply(user, vec, res.weight, res.num_tokens, res.train_loss, time.perf_counter() - t0, aux))
    return codec.NodeReply(devices, nonfinite)
