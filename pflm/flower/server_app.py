"""Flower ServerApp: pflm's own round loop (sampling, PEU, aggregation, DP, accounting) driving Flower SuperNodes.

`FlowerSimulator` is the in-process `Simulator` with one method replaced: `run_round` sends each SuperNode one
`train` message with the round plan and the cohort users it owns, and streams the clipped updates it gets back
into pflm's aggregator (`begin` / `add` / `drop` / `finalize`), then calls `FederatedServer.finish_round`
(noise, averaging, server optimizer, accountant). Resume, checkpoints, metrics.jsonl, evaluation and
summary.json are the simulator's own code, so both backends write the same artifacts.

DP and aggregation stay in pflm rather than in Flower's strategies and mods: Flower's DP mods reject replies
whose array keys differ from what was sent (PEU sends a different row set every round), and Flower's SecAgg+
only exists on the legacy API with 32-bit mask seeds (see docs/flower.md).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable
from logging import INFO, WARNING

from flwr.app import Context, Message, MessageType
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from pflm.config import RecipeConfig, load_recipe
from pflm.errors import PflmError
from pflm.flower import codec, partition
from pflm.simulation.simulator import Simulator

DEFAULT_ROUND_TIMEOUT = 3600.0
DEFAULT_NODE_WAIT = 120.0


class FlowerSimulator(Simulator):
    """The in-process simulator whose device fan-out goes through a Flower `Grid` instead of a local loop."""

    local_devices = False

    def __init__(self, cfg: RecipeConfig, grid: Grid, round_timeout: float = DEFAULT_ROUND_TIMEOUT,
                 node_wait: float = DEFAULT_NODE_WAIT) -> None:
        super().__init__(cfg)
        self.grid = grid
        self.round_timeout = round_timeout
        self.node_wait = node_wait
        self.recipe_json = codec.recipe_payload(cfg)
        self.threads = max(1, int(cfg.flower.cpus_per_client))  # torch threads per ClientApp
        self.node_of_partition: dict[int, int] = {}

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
        msgs = [Message(partition.encode_query(), dst_node_id=n, message_type=MessageType.QUERY) for n in sorted(nodes)]
        replies = list(self.grid.send_and_receive(msgs, timeout=self.node_wait))
        parts: dict[int, int] = {}
        sizes = set()
        for rep in replies:
            if rep.has_error():
                log(WARNING, "[pflm] node %s did not report its partition: %s", rep.metadata.src_node_id, rep.error.reason)
                continue
            pid, n = partition.decode_partition(rep.content)
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
    def run_round(self, r: int) -> dict:
        if not self.node_of_partition:
            self.discover()
        t0 = time.perf_counter()
        server, agg = self.server, self.aggregator
        plan = server.plan_round(r)
        agg.begin(plan.ctx)
        n_parts = len(self.node_of_partition)
        share: dict[int, list[int]] = {}
        for user in plan.cohort:
            share.setdefault(partition.owner(user, n_parts), []).append(user)
        parts = sorted(share)
        msgs = [
            Message(
                codec.encode_train(plan, share[p], self.recipe_json, self.population, self.threads),
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
        m = {"round": r, "cohort": len(plan.cohort), "nonfinite_dropped": nonfinite}
        if failed:
            m["node_dropped"] = failed
        m["device_seconds"] = device_seconds
        return self.close_round(plan, m, t0, losses, tokens)

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


def recipe_from_run_config(run_config: dict) -> RecipeConfig:
    """Deployment: the recipe path and `k=v` overrides come from the Flower run config."""
    path = str(run_config.get("recipe", "") or "") or None
    overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    return load_recipe(path, overrides + ["backend=flower"])


def build_server_app(cfg: RecipeConfig | None = None, result: dict | None = None, progress: bool = False) -> ServerApp:
    """A ServerApp for `cfg` (simulation, same process) or for the recipe named in the run config (deployment).

    The run's summary dict is copied into `result` when given (it is always written to RUN_DIR/summary.json).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = context.run_config
        recipe = cfg if cfg is not None else recipe_from_run_config(rc)
        sim = FlowerSimulator(
            recipe, grid,
            round_timeout=float(rc.get("round-timeout", DEFAULT_ROUND_TIMEOUT)),
            node_wait=float(rc.get("node-wait", DEFAULT_NODE_WAIT)),
        )
        log(INFO, "[pflm] run %s → %s", recipe.name, recipe.run_dir.resolve())
        summary = sim.run(progress=progress or bool(rc.get("progress", False)))
        if result is not None:
            result.update(summary)

    return server_app


app = build_server_app()
