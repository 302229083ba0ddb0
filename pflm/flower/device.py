"""The node side of a Flower round: pflm's `DeviceTrainer` + device postprocessors on the users a node owns.

One `DeviceTrainer` is built per process and device spec (the device half of the recipe, sent with each train
message) and reused for every message (`_NODE_CACHE`): Ray actors and a long-lived `flwr-clientapp` process keep it
for the whole run. Per message the round's device model is loaded once, then each user
goes through `pflm.device.update.device_update` (local training, then clipping) exactly as in the
in-process simulator.

Device randomness: each (round, user) trains with a fresh secret `new_key()` drawn on the node (a real device's
local randomness: nobody else, the server included, can replay its DP-SGD noise or batches). Only with
`privacy.reproducible=true` — and only if the node's own policy allows it (`pflm.flower.policy`) — is the key
`subkey(derive_key(seed), "device", round, user)`, i.e. derived from the public recipe seed: reproducible, and as
secret as the seed (not at all, if the recipe is public).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pflm.data.store import FederatedData
from pflm.device.spec import DeviceSpec
from pflm.device.trainer import DeviceTrainer
from pflm.errors import PflmError
from pflm.flower import codec
from pflm.flower.policy import NodePolicy
from pflm.flower.tasks import check_partition, collect
from pflm.device.update import device_update
from pflm.privacy.base import Postprocessor
from pflm.privacy.clipping import NonFiniteUpdate
from pflm.privacy.mechanism import device_postprocessors
from pflm.secure_random import derive_key, new_key, subkey


@dataclass
class NodeState:
    spec: DeviceSpec
    policy: NodePolicy
    fd: FederatedData
    trainer: DeviceTrainer
    device_steps: list[Postprocessor]  # the device-side half of the recipe's privacy chain (clipping)


_NODE_CACHE: dict[str, NodeState] = {}


def node_state(spec_json: str, policy: NodePolicy, data_dir: str | None = None) -> NodeState:
    """The process-wide trainer for this device spec and data (built on first use, then reused)."""
    path = data_dir or policy.data_dir
    key = hashlib.sha256(f"{spec_json}\n{path}\n{policy.allow_reproducible}".encode()).hexdigest()
    st = _NODE_CACHE.get(key)
    if st is None:
        spec = DeviceSpec.from_json(spec_json)
        if not path or not Path(path).is_dir():
            raise PflmError(f"prepared data dir {path!r} not found on this node; set --node-config 'data-dir=\"DIR\"' "
                            "(or data_dir in the node's policy file)")
        fd = FederatedData.open(path)
        if fd.tokenizer.vocab_size != spec.vocab_size:
            raise PflmError(f"this node's data has a {fd.tokenizer.vocab_size}-word vocabulary, the run's model "
                            f"{spec.vocab_size}: point the node at the run's prepared data")
        trainer = DeviceTrainer(spec, fd.prior_counts())  # as the in-process fan-out does
        st = NodeState(spec, policy, fd, trainer, device_postprocessors(spec))
        _NODE_CACHE.clear()  # one run per process at a time: free the previous run's model
        _NODE_CACHE[key] = st
    return st


def device_key(st: NodeState, seed: int, round_idx: int, user: int) -> bytes:
    """The secret key of one device's local training: fresh from the OS CSPRNG, or seed-derived if the run is
    reproducible and the node's policy allows it (otherwise the node refuses the round)."""
    if st.policy.check_reproducible(st.spec.reproducible):
        return subkey(derive_key(seed), "device", round_idx, user)
    return new_key()


def user_updates(st: NodeState, task: codec.TrainTask) -> Iterator[tuple[int, codec.DeviceReply | None]]:
    """(user, its clipped update and scalars — or None if the update was NaN/Inf and dropped on the device) for
    each user of the task, in order: the same calls as the in-process fan-out."""
    st.trainer.load_round(task.ctx.round, task.device_state, task.rows)
    for user in task.users:
        t0 = time.perf_counter()
        try:
            key = device_key(st, task.ctx.seed, task.ctx.round, user)
            res, vec, aux = device_update(st.trainer, st.device_steps, task.ctx, user, st.fd.user_tokens("train", user), key)
        except NonFiniteUpdate:
            yield user, None
            continue
        yield user, codec.DeviceReply(user, vec, res.weight, res.num_tokens, res.train_loss, time.perf_counter() - t0, aux)


def train_users(st: NodeState, task: codec.TrainTask, partition: tuple[int, int] | None) -> codec.NodeReply:
    """Run pflm's device update for each user of the task (the same calls as the in-process simulator)."""
    check_partition(task.users, partition)
    return collect(user_updates(st, task))
