"""Wire format between pflm's Flower ServerApp and ClientApp: round plans and device replies as Flower records.

A train message carries one node's share of a round: the device model (`ArrayRecord`, vocabulary tensors
already cut to the round's PEU rows), the selected rows, and a `ConfigRecord` with the public round context
(round, cohort, clip bound, release dimension, seed), the users this node must train, the recipe (JSON) and
the training population. The reply carries one clipped flat update per trained user (`ArrayRecord`, keyed by
user id) and the per-user scalars the aggregator and the round metrics need (`MetricRecord`, lists aligned
with `users`). Everything is float32/int64 bytes, so a round trip is exact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from pflm.config import RecipeConfig, recipe_to_dict
from pflm.config_base import from_dict
from pflm.round import RoundContext, RoundPlan

STATE = "state"
ROWS = "rows"
CONFIG = "config"
UPDATES = "updates"
STATS = "stats"
AUX_PREFIX = "aux."


def recipe_payload(cfg: RecipeConfig) -> str:
    """The recipe as JSON for the nodes, with `data.dir` made absolute (nodes may run in another directory)."""
    d = recipe_to_dict(cfg)
    if d["data"]["dir"]:
        d["data"]["dir"] = str(Path(d["data"]["dir"]).expanduser().resolve())
    return json.dumps(d, sort_keys=True)


def recipe_from_payload(payload: str) -> RecipeConfig:
    return from_dict(RecipeConfig, json.loads(payload))


@dataclass
class TrainTask:
    """One node's work for one round, as decoded on the node."""

    ctx: RoundContext
    users: list[int]
    rows: torch.Tensor | None
    device_state: dict[str, torch.Tensor]
    recipe_json: str
    population: int
    threads: int


def encode_train(plan: RoundPlan, users: list[int], recipe_json: str, population: int, threads: int) -> RecordDict:
    """The message to one node. Its context names only the users that node trains, never the whole cohort:
    who else was sampled is secret (the ε relies on amplification by subsampling)."""
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
            "recipe": recipe_json,
            "population": int(population),
            "threads": int(threads),
        }
    )
    content = RecordDict({STATE: ArrayRecord(torch_state_dict=plan.device_state), CONFIG: config})
    if plan.rows is not None:
        content[ROWS] = ArrayRecord(array_dict={ROWS: Array(np.ascontiguousarray(plan.rows.numpy().astype(np.int64)))})
    return content


def decode_train(content: RecordDict) -> TrainTask:
    c = content.config_records[CONFIG]
    ctx = RoundContext(
        round=int(c["round"]),
        dim=int(c["dim"]),
        cohort=[int(u) for u in c["cohort"]],
        clip_bound=float(c["clip-bound"]),
        seed=int(c["seed"]),
        extra=json.loads(str(c["ctx-extra"])),
    )
    rows = None
    if ROWS in content.array_records:
        rows = torch.from_numpy(content.array_records[ROWS][ROWS].numpy().copy())
    state = dict(content.array_records[STATE].to_torch_state_dict())
    return TrainTask(
        ctx=ctx,
        users=[int(u) for u in c["users"]],
        rows=rows,
        device_state=state,
        recipe_json=str(c["recipe"]),
        population=int(c["population"]),
        threads=int(c["threads"]),
    )


@dataclass
class DeviceReply:
    """One trained user's contribution as the server sees it: the clipped (weighted) vector and its scalars."""

    user: int
    update: torch.Tensor
    weight: float
    num_tokens: int
    train_loss: float
    seconds: float
    aux: dict[str, float] = field(default_factory=dict)


@dataclass
class NodeReply:
    devices: list[DeviceReply]
    nonfinite: list[int]  # users whose update had NaN/Inf (dropped on the device)


def encode_reply(reply: NodeReply) -> RecordDict:
    updates = ArrayRecord(
        array_dict={str(d.user): Array(np.ascontiguousarray(d.update.detach().numpy().astype(np.float32))) for d in reply.devices}
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

