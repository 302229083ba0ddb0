"""Node ↔ user mapping: SuperNode `partition-id` p of `num-partitions` n owns the training users u with u mod n = p.

Kept free of torch so that the ClientApp can answer the ServerApp's partition query without importing it (a
deployed SuperNode starts a fresh process for every message).
"""

from __future__ import annotations

from flwr.app import ConfigRecord, Context, RecordDict

from pflm.errors import PflmError

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
CONFIG = "config"


def node_partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node config, validated."""
    nc = context.node_config
    if PARTITION_ID not in nc or NUM_PARTITIONS not in nc:
        raise PflmError("this SuperNode has no partition; start it with --node-config 'partition-id=I num-partitions=N'")
    pid, n = int(nc[PARTITION_ID]), int(nc[NUM_PARTITIONS])
    if not 0 <= pid < n:
        raise PflmError(f"partition-id={pid} is outside 0..{n - 1}; fix the SuperNode's --node-config")
    return pid, n


def owner(user: int, num_partitions: int) -> int:
    return user % num_partitions


def encode_query() -> RecordDict:
    return RecordDict({CONFIG: ConfigRecord({"want": "partition"})})


def encode_partition(partition_id: int, num_partitions: int) -> RecordDict:
    return RecordDict({CONFIG: ConfigRecord({PARTITION_ID: int(partition_id), NUM_PARTITIONS: int(num_partitions)})})


def decode_partition(content: RecordDict) -> tuple[int, int]:
    c = content.config_records[CONFIG]
    return int(c[PARTITION_ID]), int(c[NUM_PARTITIONS])
