"""Torch-free handling of a node's train task: check it, run it here or in the node's warm worker, collect replies.

Kept apart from `pflm.flower.device` (which loads torch, the model and the data) so that a SuperNode whose
ClientApp forwards to a warm worker (`pflm.flower.warm`) never imports torch in its per-message process.
"""

from __future__ import annotations

from collections.abc import Iterator

from pflm.errors import PflmError
from pflm.flower import codec
from pflm.flower.policy import NodePolicy
from pflm.flower.shards import owner


def check_partition(users: list[int], partition: tuple[int, int] | None) -> None:
    """Refuse users that do not belong to this node's partition."""
    if partition is not None:
        pid, n = partition
        foreign = [u for u in users if owner(u, n) != pid]
        if foreign:
            raise PflmError(f"users {foreign[:5]} do not belong to partition {pid} of {n}")


def node_updates(payload: codec.TrainPayload, policy: NodePolicy, data_dir: str | None,
                 worker: str | None = None) -> Iterator[tuple[int, codec.DeviceReply | None]]:
    """`pflm.flower.device.user_updates` in this process, or in the node's warm worker process if it has one
    (this process then never loads torch)."""
    if worker:
        from pflm.flower.warm import remote_updates

        return remote_updates(worker, payload, policy, data_dir)
    from pflm.flower.device import node_state, user_updates

    task = codec.decode_payload(payload)
    return user_updates(node_state(task.spec_json, policy, data_dir), task)


def collect(updates: Iterator[tuple[int, codec.DeviceReply | None]]) -> codec.NodeReply:
    devices, nonfinite = [], []
    for user, rep in updates:
        if rep is None:
            nonfinite.append(user)
        else:
            devices.append(rep)
    return codec.NodeReply(devices, nonfinite)
