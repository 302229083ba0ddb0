"""Wire format between pflm's Flower ServerApp and ClientApp: round plans and device replies as Flower records.

A train message carries one node's share of a round: the device model (`ArrayRecord`, vocabulary tensors
already cut to the round's PEU rows), the selected rows, and a `ConfigRecord` with the public round context
(round, clip bound, release dimension, seed), the users this node must train and the device spec (JSON: the device
half of the recipe, `pflm.device.spec`; the recipe itself never leaves the server). The reply carries one clipped flat update per trained user (`ArrayRecord`, keyed by
user id) and the per-user scalars the aggregator and the round metrics need (`MetricRecord`, lists aligned
with `users`). Everything is float32/int64 bytes, so a round trip is exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

if TYPE_CHECKING:  # torch is imported only where tensors are built: a node with a warm worker never loads it
    import torch

    from pflm.round import RoundContext, RoundPlan

STATE = "state"
ROWS = "rows"
CONFIG = "config"
UPDATES = "updates"
STATS = "stats"
AUX_PREFIX = "aux."


@dataclass
class TrainTask:
    """One node's work for one round, as decoded on the node."""

    ctx: RoundContext
    users: list[int]
    rows: torch.Tensor | None
    device_state: dict[str, torch.Tensor]
    spec_json: str
    threads: int


def encode_train(plan: RoundPlan, users: list[int], threads: int, spec_json: str | None = None) -> RecordDict:
    """The message to one node. Its context names only the users that node trains, never the whole cohort:
    who else was sampled is secret (the ε relies on amplification by subsampling). `spec_json` may be given to
    avoid re-serialising `plan.spec` for every node."""
    ctx = plan.ctx
    config = ConfigRecord(
        {
            "round": int(plan.round),
            "users": [int(u) for u in users],
            "cohort": [int(u) for u in users],
            "clip-bound": float(ctx.clip_bound),
            "dim": int(ctx.dim),
            "seed": int(ctx.seed),
            "ctx-extra": json.dumps(ctx.extra, sort_keys=True),
            "spec": spec_json if spec_json is not None else plan.spec.to_json(),
            "threads": int(threads),
        }
    )
    content = RecordDict({STATE: ArrayRecord(torch_state_dict=plan.device_state), CONFIG: config})
    if plan.rows is not None:
        content[ROWS] = ArrayRecord(array_dict={ROWS: Array(np.ascontiguousarray(plan.rows.numpy().astype(np.int64)))})
    return content


@dataclass
class TrainPayload:
    """A train message's content as plain values and NumPy arrays (no torch): what a node checks, and what it
    forwards to its warm worker (`pflm.flower.warm`)."""

    config: dict[str, Any]
    state: dict[str, np.ndarray]
    rows: np.ndarray | None

    @property
    def users(self) -> list[int]:
        return [int(u) for u in self.config["users"]]


def train_payload(content: RecordDict) -> TrainPayload:
    c = content.config_records[CONFIG]
    rows = content.array_records[ROWS][ROWS].numpy() if ROWS in content.array_records else None
    state = {k: a.numpy() for k, a in content.array_records[STATE].items()}
    return TrainPayload(dict(c.items()), state, rows)


def decode_payload(p: TrainPayload) -> TrainTask:
    """The node-side task (torch tensors) of a payload."""
    import torch

    from pflm.round import RoundContext

    c = p.config
    ctx = RoundContext(
        round=int(c["round"]),
        dim=int(c["dim"]),
        cohort=[int(u) for u in c["cohort"]],
        clip_bound=float(c["clip-bound"]),
        seed=int(c["seed"]),
        extra=json.loads(str(c["ctx-extra"])),
    )
    rows = None if p.rows is None else torch.from_numpy(np.array(p.rows, copy=True))
    state = {k: torch.from_numpy(np.array(v, copy=True)) for k, v in p.state.items()}
    return TrainTask(
        ctx=ctx,
        users=p.users,
        rows=rows,
        device_state=state,
        spec_json=str(c["spec"]),
        threads=int(c["threads"]),
    )


def decode_train(content: RecordDict) -> TrainTask:
    return decode_payload(train_payload(content))


@dataclass
class DeviceReply:
    """One trained user's contribution as the server sees it: the clipped (weighted) vector and its scalars."""

    user: int
    update: torch.Tensor | np.ndarray  # float32; a warm worker's replies arrive as NumPy
    weight: float
    num_tokens: int
    train_loss: float
    seconds: float
    aux: dict[str, float] = field(default_factory=dict)


@dataclass
class NodeReply:
    devices: list[DeviceReply]
    nonfinite: list[int]  # users whose update had NaN/Inf (dropped on the device)


def numpy_of(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def encode_reply(reply: NodeReply) -> RecordDict:
    updates = ArrayRecord(
        array_dict={str(d.user): Array(np.ascontiguousarray(numpy_of(d.update), dtype=np.float32)) for d in reply.devices}
    )
    stats: dict = {
        "users": [d.user for d in reply.devices],
        "weights": [float(d.weight) for d in reply.devices],
        "num-tokens": [int(d.num_tokens) for d in reply.devices],
        "train-loss": [float(d.train_loss) for d in reply.devices],
        "seconds": [float(d.seconds) for d in reply.devices],
        "nonfinite": [int(u) for u in reply.nonfinite],
    }
    keys = sorted({k for d in reply.devices for k in d.aux})
    for k in keys:
        stats[AUX_PREFIX + k] = [float(d.aux.get(k, 0.0)) for d in reply.devices]
    stats = {k: v for k, v in stats.items() if v}  # empty lists carry no type on the wire
    return RecordDict({UPDATES: updates, STATS: MetricRecord(stats)})


def decode_reply(content: RecordDict) -> NodeReply:
    import torch

    s = content.metric_records[STATS]
    updates = content.array_records[UPDATES]

    def col(name: str) -> list:
        return list(s[name]) if name in s else []

    users = [int(u) for u in col("users")]
    aux_cols = {k[len(AUX_PREFIX):]: col(k) for k in s.keys() if k.startswith(AUX_PREFIX)}
    devices = []
    for i, u in enumerate(users):
        devices.append(
            DeviceReply(
                user=u,
                update=torch.from_numpy(updates[str(u)].numpy().copy()),
                weight=float(col("weights")[i]),
                num_tokens=int(col("num-tokens")[i]),
                train_loss=float(col("train-loss")[i]),
                seconds=float(col("seconds")[i]),
                aux={k: float(v[i]) for k, v in aux_cols.items()},
            )
        )
    return NodeReply(devices, [int(u) for u in col("nonfinite")])

