"""A node-local worker process that keeps torch and the device trainer loaded between Flower messages.

A deployed Flower 1.42 SuperNode runs every message in a fresh `flwr-clientapp` process, which would import torch,
build the model and open the data again for every round. The node's owner can instead start
`pflm node-worker --socket PATH` beside the SuperNode and name it in the node config (`worker="PATH"`): the
ClientApp then stays torch-free and forwards each train task over the Unix socket; the worker runs exactly
`pflm.flower.device.user_updates` with its cached trainer and streams the clipped updates back, one user at a time.

Trust: the worker is part of the node (same owner, same machine). The socket and its key file (`PATH.key`, 32 random
bytes, mode 0600) are readable only by the node's user, and every connection is authenticated with that key
(`multiprocessing.connection`'s HMAC challenge) before anything is unpickled. The node's policy and data dir travel
with each request from the ClientApp, which read them from the node's own config.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import sys
import traceback
from collections.abc import Iterator
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path

from pflm.errors import PflmError
from pflm.flower import codec
from pflm.flower.policy import NodePolicy


def key_path(socket_path: str | Path) -> Path:
    return Path(f"{socket_path}.key")


def _write_key(path: Path) -> bytes:
    key = os.urandom(32)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
    os.replace(tmp, path)
    return key


def serve(socket_path: str | Path, threads: int = 0, max_requests: int = 0) -> None:
    """Answer train tasks on `socket_path` until killed (or after `max_requests` > 0 of them)."""
    path = Path(socket_path)
    if path.exists():
        if not stat.S_ISSOCK(path.stat().st_mode):
            raise PflmError(f"{path} exists and is not a socket; choose another --socket path")
        path.unlink()  # a stale socket of a previous worker
    path.parent.mkdir(parents=True, exist_ok=True)
    key = _write_key(key_path(path))
    old = os.umask(0o077)
    try:
        listener = Listener(str(path), family="AF_UNIX", authkey=key)
    finally:
        os.umask(old)
    import torch  # loaded once, here, instead of in every message's process

    if threads > 0:
        torch.set_num_threads(threads)
    print(f"[pflm] node worker ready on {path}", file=sys.stderr, flush=True)
    served = 0
    with listener:
        while not max_requests or served < max_requests:
            try:
                conn = listener.accept()
            except Exception as e:  # noqa: BLE001 - a client with the wrong key must not stop the worker
                print(f"[pflm] node worker refused a connection: {e}", file=sys.stderr, flush=True)
                continue
            with conn:
                _handle(conn)
            served += 1


def _handle(conn: Connection) -> None:
    from pflm.schema import from_dict
    from pflm.flower.device import node_state, user_updates

    try:
        req = conn.recv()
        task = codec.decode_payload(req["task"])
        policy = from_dict(NodePolicy, req["policy"], "policy")
        st = node_state(task.spec_json, policy, req["data_dir"])
        for user, rep in user_updates(st, task):
            if rep is None:
                conn.send(("nonfinite", user))
            else:
                conn.send(("update", dataclasses.replace(rep, update=rep.update.detach().numpy())))
        conn.send(("done",))
    except Exception as e:  # noqa: BLE001 - reported to the ClientApp, which fails the message with it
        traceback.print_exc(file=sys.stderr)
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass


def remote_updates(socket_path: str, payload: codec.TrainPayload, policy: NodePolicy,
                   data_dir: str | None) -> Iterator[tuple[int, codec.DeviceReply | None]]:
    """`pflm.flower.device.user_updates`, computed by the node's warm worker."""
    try:
        key = key_path(socket_path).read_bytes()
        conn = Client(socket_path, family="AF_UNIX", authkey=key)
    except (OSError, EOFError) as e:
        raise PflmError(f"cannot reach this node's worker at {socket_path} ({e}); start `pflm node-worker --socket "
                        f"{socket_path}` or remove worker from the node config") from None
    with conn:
        conn.send({"task": payload, "policy": dataclasses.asdict(policy), "data_dir": data_dir})
        while True:
            msg = conn.recv()
            if msg[0] == "done":
                return
            if msg[0] == "error":
                raise PflmError(f"the node worker failed: {msg[1]}")
            if msg[0] == "nonfinite":
                yield int(msg[1]), None
            else:
                yield msg[1].user, msg[1]
