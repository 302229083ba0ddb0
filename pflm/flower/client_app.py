"""Flower ClientApp: a SuperNode trains the users the ServerApp assigns to it with pflm's own device code.

Each SuperNode owns one data partition (`pflm.flower.shards`: `partition-id` / `num-partitions` come from
the node config, set automatically in simulation and with `--node-config` in a deployment). The ServerApp
first asks every node for its partition (`query` message), then each round sends every node one `train`
message with the round plan and the cohort users it owns; the node runs `pflm.flower.device.train_users`
(DeviceTrainer + clipping via `pflm.device.update.device_update`) and replies with the clipped vectors.

With secure aggregation (`aggregation.kind=secure`, `mode=full`) the ServerApp sends `train.secagg_<stage>`
messages instead (advertise, share, receive, train, sign, unmask): the device half of the protocol runs here
(`pflm.flower.secure_node`), with the devices' secrets kept in `context.state` between stages.

torch and the trainer are imported only when a train message arrives: a deployed SuperNode starts a fresh
`flwr-clientapp` process per message, so the partition query stays cheap. In simulation the Ray actor keeps
the trainer between messages.

Optional node config: `data-dir="DIR"` (this node's copy of the prepared data; default: `data_dir` of the
node's policy), `threads=N` (torch threads; default: what the server sends, i.e. int(flower.cpus_per_client),
at least 1), `policy="FILE"` (what the node's devices trust, `pflm.flower.policy`; default $PFLM_NODE_POLICY, else
the strict built-in policy), `worker="SOCKET"` (a warm `pflm node-worker` on this node that keeps torch and the
trainer loaded between messages, `pflm.flower.warm`; without it each message's process builds them).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pflm.flower import shards

DATA_DIR_KEY = "data-dir"
THREADS_KEY = "threads"
WORKER_KEY = "worker"

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    pid, n = shards.node_partition(context)
    return Message(shards.encode_partition(pid, n), reply_to=msg)


def _node_settings(context: Context, sent_threads: int, trains_here: bool) -> tuple[int, str | None]:
    """(threads, data dir) of this node from its node config (threads: else what the server sent; data dir: else the
    node's policy file). If this process trains (no warm worker), the threads are applied to its torch; otherwise
    torch is never loaded here."""
    threads = int(context.node_config.get(THREADS_KEY, 0) or 0) or int(sent_threads)
    if trains_here and threads > 0:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    data_dir = context.node_config.get(DATA_DIR_KEY)
    return threads, str(data_dir) if data_dir else None


def node_worker(context: Context) -> str | None:
    """The socket of this node's warm worker (`pflm node-worker`), if its node config names one."""
    w = context.node_config.get(WORKER_KEY)
    return str(w) if w else None


@app.train()
def train(msg: Message, context: Context) -> Message:
    from pflm.flower import codec
    from pflm.flower.tasks import check_partition, collect, node_updates
    from pflm.flower.policy import node_policy

    payload = codec.train_payload(msg.content)  # torch-free: with a warm worker this process never loads torch
    worker = node_worker(context)
    _, data_dir = _node_settings(context, int(payload.config["threads"]), trains_here=worker is None)
    check_partition(payload.users, shards.node_partition(context))
    updates = node_updates(payload, node_policy(context.node_config), data_dir, worker)
    return Message(codec.encode_reply(collect(updates)), reply_to=msg)


# ---- secure aggregation: the device half of the protocol (pflm.flower.secure_node), one action per round ----
@app.train("secagg_advertise")
def secagg_advertise(msg: Message, context: Context) -> Message:
    from pflm.flower import secure_node

    return secure_node.advertise(msg, context, shards.node_partition(context))


@app.train("secagg_share")
def secagg_share(msg: Message, context: Context) -> Message:
    from pflm.flower import secure_node

    return secure_node.share(msg, context)


@app.train("secagg_receive")
def secagg_receive(msg: Message, context: Context) -> Message:
    from pflm.flower import secure_node

    return secure_node.receive(msg, context)


@app.train("secagg_train")
def secagg_train(msg: Message, context: Context) -> Message:
    from pflm.flower import codec, secure_node

    worker = node_worker(context)
    sent = int(msg.content.config_records[codec.CONFIG]["threads"])
    threads, data_dir = _node_settings(context, sent, trains_here=worker is None)
    return secure_node.train(msg, context, shards.node_partition(context), threads, data_dir, worker)


@app.train("secagg_sign")
def secagg_sign(msg: Message, context: Context) -> Message:
    from pflm.flower import secure_node

    return secure_node.sign(msg, context)


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    from pflm.flower import secure_node

    return secure_node.unmask(msg, context)
