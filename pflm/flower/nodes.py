"""The Flower fan-out: a round's cohort trained on Flower SuperNodes through the Message API (`FlowerNodes`).

Each round the driver's plan goes to every SuperNode that owns cohort users, as one `train` message naming only
those users (never the whole cohort); the clipped updates they return are streamed into pflm's aggregator
(`receive` / `drop`). Nodes that fail or time out lose only their own users. Discovery asks every node for its
partition once. With secure aggregation (`mode=full`) `attach` installs a `RemoteSecureAggregator` as the
driver's aggregator and each round runs the protocol's stages on the nodes (`pflm.flower.secure.SecureRound`):
the ServerApp then receives masked vectors only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from logging import INFO, WARNING
from typing import TYPE_CHECKING

from flwr.app import Message, MessageType
from flwr.common import log
from flwr.serverapp import Grid

from pflm.aggregator.base import Aggregator
from pflm.aggregator.secagg.remote import RemoteSecureAggregator
from pflm.config import RecipeConfig
from pflm.driver.fanout import DeviceFanout, RoundTally
from pflm.errors import PflmError
from pflm.flower import codec, shards
from pflm.flower.secure import SecureRound
from pflm.round import RoundPlan
from pflm.runtime import thread_plan

if TYPE_CHECKING:
    from pflm.driver.run import RunDriver

DEFAULT_ROUND_TIMEOUT = 3600.0
DEFAULT_NODE_WAIT = 120.0


def remote_secure_aggregator(driver: RunDriver, enabled: bool = True) -> RemoteSecureAggregator | None:
    """The ServerApp's aggregator for `aggregation.kind=secure`, `aggregation.secagg.mode=full`: only the server
    half of the protocol, the device half runs on the SuperNodes (None: keep the driver's own aggregator — plain
    aggregation, `mode=simulate`, or `enabled=False`).

    Its codec layout is fixed before any device encodes: the aux keys of the recipe's device postprocessors
    (probed on a zero update, or `aggregation.secagg.aux_keys`) plus the side values (loss × tokens, tokens).
    """
    from pflm.aggregator.secagg import SecureAggregator

    agg = driver.aggregator
    if not enabled or not isinstance(agg, SecureAggregator) or agg.config.mode != "full":
        return None
    cfg = driver.cfg
    keys = tuple(agg.config.aux_keys)
    if not keys:
        import torch

        from pflm.round import RoundContext

        probe = RoundContext(0, 4, [], 1.0, cfg.seed)
        aux: dict[str, float] = {}
        for step in driver.server.postprocessors:  # the run's own chain: its device half is what nodes run
            _, a = step.on_device(torch.zeros(4), probe)
            aux.update(a)
        keys = tuple(sorted(aux))
    max_sent = cfg.data.max_sentences_per_device
    token_bound = float((cfg.data.max_tokens + 2) * max_sent) if max_sent > 0 else 1e6
    remote = RemoteSecureAggregator(agg.config, seed=cfg.seed, aux_keys=keys, token_bound=token_bound)
    remote.codec_factory = agg.codec_factory  # distributed DP: the devices encode with the round's DDP codec
    return remote


class FlowerNodes(DeviceFanout):
    """The device fan-out over a Flower `Grid`: each round, one `train` message per SuperNode that owns cohort
    users (naming only those users), and the clipped updates they return are streamed into the aggregator."""

    def __init__(self, grid: Grid, round_timeout: float = DEFAULT_ROUND_TIMEOUT,
                 node_wait: float = DEFAULT_NODE_WAIT, secagg_on_nodes: bool = True) -> None:
        self.grid = grid
        self.secagg_on_nodes = secagg_on_nodes
        self.round_timeout = round_timeout
        self.node_wait = node_wait
        self.node_of_partition: dict[int, int] = {}

    def thread_split(self, cfg: RecipeConfig) -> tuple[int, int, int]:
        """Devices train on the nodes: this process trains none and uses every thread for the server's work."""
        _, _, total = thread_plan(cfg)
        return 1, total, total

    def attach(self, driver: RunDriver) -> None:
        """Also replaces the driver's aggregator for secure aggregation (see `remote_secure_aggregator`)."""
        self.cfg = driver.cfg
        self.spec_json = driver.server.device_spec.to_json()  # what nodes learn of the recipe
        self.threads = max(1, int(driver.cfg.flower.cpus_per_client))  # torch threads per ClientApp
        remote = remote_secure_aggregator(driver, self.secagg_on_nodes)
        if remote is not None:
            driver.aggregator = remote

    # ---- node discovery ---------------------------------------------------------------------------------------
    def discover(self) -> dict[int, int]:
        """Wait for `flower.num_supernodes` nodes, ask each for its partition; return partition → node id."""
        want = self.cfg.flower.num_supernodes
        deadline = time.monotonic() + self.node_wait
        nodes = list(self.grid.get_node_ids())
        while len(nodes) < want:
            if time.monotonic() > deadline:
                raise PflmError(
                    f"only {len(nodes)} of flower.num_supernodes={want} SuperNodes connected within {self.node_wait:.0f} s; "
                    "start more SuperNodes or lower flower.num_supernodes"
                )
            time.sleep(0.2)
            nodes = list(self.grid.get_node_ids())
        msgs = [Message(shards.encode_query(), dst_node_id=n, message_type=MessageType.QUERY) for n in sorted(nodes)]
        replies = list(self.grid.send_and_receive(msgs, timeout=self.node_wait))
        parts: dict[int, int] = {}
        sizes = set()
        for rep in replies:
            if rep.has_error():
                log(WARNING, "[pflm] node %s did not report its partition: %s", rep.metadata.src_node_id, rep.error.reason)
                continue
            pid, n = shards.decode_partition(rep.content)
            sizes.add(n)
            if pid in parts:
                raise PflmError(f"two SuperNodes claim partition-id={pid}; give each node its own partition-id")
            parts[pid] = rep.metadata.src_node_id
        if not sizes:
            raise PflmError("no SuperNode answered the partition query; check the SuperNodes' logs and --node-config")
        if len(sizes) != 1:
            raise PflmError(f"SuperNodes disagree on num-partitions ({sorted(sizes)}); use the same value on every node")
        n = sizes.pop()
        missing = sorted(set(range(n)) - set(parts))
        if missing:
            raise PflmError(f"no SuperNode serves partition(s) {missing} of {n}; start one per partition-id")
        log(INFO, "[pflm] %d partitions on nodes %s", n, [parts[p] for p in range(n)])
        self.node_of_partition = parts
        return parts

    # ---- one round --------------------------------------------------------------------------------------------
    def train_round(self, plan: RoundPlan, agg: Aggregator) -> RoundTally:
        if not self.node_of_partition:
            self.discover()
        if isinstance(agg, RemoteSecureAggregator):  # the device half of SecAgg runs on the nodes
            return SecureRound(self, plan, agg).run()
        r = plan.round
        n_parts = len(self.node_of_partition)
        share: dict[int, list[int]] = {}
        for user in plan.cohort:
            share.setdefault(shards.owner(user, n_parts), []).append(user)
        parts = sorted(share)
        msgs = [
            Message(
                codec.encode_train(plan, share[p], self.threads, self.spec_json),
                dst_node_id=self.node_of_partition[p], message_type=MessageType.TRAIN,
            )
            for p in parts
        ]
        ids = list(self.grid.push_messages(msgs))
        del msgs
        if len(ids) != len(parts):  # the SuperLink refused the whole batch (e.g. payload too large)
            ids = [None] * len(parts)
        nonfinite, failed, losses, tokens, device_seconds = 0, 0, 0.0, 0, 0.0
        users_of: dict[str, list[int]] = {}
        for mid, p in zip(ids, parts):
            if mid is None:
                log(WARNING, "[pflm] round %d: could not send to partition %d; dropping its users", r, p)
                failed += len(share[p])
                for u in share[p]:
                    agg.drop(u)
            else:
                users_of[mid] = share[p]

        def on_reply(rep: Message) -> None:
            nonlocal nonfinite, failed, losses, tokens, device_seconds
            users = users_of[rep.metadata.reply_to_message_id]
            if rep.has_error():
                log(WARNING, "[pflm] round %d: node %s failed (%s); dropping %d users", r,
                    rep.metadata.src_node_id, rep.error.reason, len(users))
                failed += len(users)
                for u in users:
                    agg.drop(u)
                return
            reply = codec.decode_reply(rep.content)
            asked = set(users)
            stray = [d.user for d in reply.devices if d.user not in asked] + [u for u in reply.nonfinite if u not in asked]
            if stray:  # never let a node contribute for users it was not asked to train
                log(WARNING, "[pflm] round %d: node %s answered for users %s it was not sent; ignored", r,
                    rep.metadata.src_node_id, stray[:5])
                reply.devices = [d for d in reply.devices if d.user in asked]
                reply.nonfinite = [u for u in reply.nonfinite if u in asked]
            for d in reply.devices:
                agg.add(d.user, d.update, d.weight, d.aux)
                losses += d.train_loss * d.num_tokens
                tokens += d.num_tokens
                device_seconds += d.seconds
            for u in reply.nonfinite:
                nonfinite += 1
                agg.drop(u)
            answered = {d.user for d in reply.devices} | set(reply.nonfinite)
            for u in users:
                if u not in answered:
                    failed += 1
                    agg.drop(u)

        lost = self._collect(set(users_of), on_reply)
        for mid in lost:
            failed += len(users_of[mid])
            for u in users_of[mid]:
                agg.drop(u)
        m = {"cohort": len(plan.cohort), "nonfinite_dropped": nonfinite}
        if failed:
            m["node_dropped"] = failed
        m["device_seconds"] = device_seconds
        return RoundTally(m, losses, tokens)

    def _collect(self, pending: set[str], on_reply: Callable[[Message], None]) -> set[str]:
        """Pull replies as they arrive (each is aggregated at once); return the ids that timed out."""
        deadline = time.monotonic() + self.round_timeout
        pause = 0.005
        while pending and time.monotonic() < deadline:
            got = list(self.grid.pull_messages(pending))
            for rep in got:
                pending.discard(rep.metadata.reply_to_message_id)
                on_reply(rep)
            if not got:
                time.sleep(pause)
                pause = min(pause * 2, 0.2)
            else:
                pause = 0.005
        if pending:
            log(WARNING, "[pflm] %d node(s) did not answer within %.0f s", len(pending), self.round_timeout)
        return pending
