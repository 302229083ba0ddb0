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

Optional node config: `data-dir="DIR"` (this node's copy of the prepared data; default: the recipe's
data.dir), `threads=N` (torch threads; default: what the server sends, i.e. int(flower.cpus_per_client),
at least 1).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pflm.flower import shards

DATA_DIR_KEY = "data-dir"
THREADS_KEY = "threads"

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    pid, n = shards.node_partition(context)
    return Message(shards.encode_partition(pid, n), reply_to=msg)


def _node_settings(context: Context, sent_threads: int) -> tuple[int, str | None]:
    """(torch threads, data dir) of this node: its node config wins over what the server sent; threads applied."""
    import torch

    threads = int(context.node_config.get(THREADS_KEY, 0) or 0) or int(sent_threads)
    if threads > 0 and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    data_dir = context.node_config.get(DATA_DIR_KEY)
    return threads, str(data_dir) if data_dir else None


@app.train()
def train(msg: Message, context: Context) -> Message:
    from pflm.flower import codec
    from pflm.flower.device import node_state, train_users

    task = codec.decode_train(msg.content)
    _, data_dir = _node_settings(context, task.threads)
    st = node_state(task.recipe_json, task.population, data_dir)
    reply = train_users(st, task, shards.node_partition(context))
    return Message(codec.encode_reply(reply), reply_to=msg)


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

    threads, data_dir = _node_settings(context, msg.content.config_records[codec.CONFIG]["threads"])
    return secure_node.train(msg, context, shards.node_partition(context), threads, data_dir)


@app.train("secagg_sign")
def secagg_sign(msg: Message, context: Context) -> Message:
    from pflm.flower import secure_node

    return secure_node.sign(msg, context)


@app.train("secagg_unmask")
def secagg_unmask(msg: Message, context: Context) -> Message:
    from pflm.flower import secure_node

    return secure_node.unmask(msg, context)
