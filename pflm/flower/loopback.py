"""A real Flower deployment on this machine (SuperLink + SuperNodes [+ warm node workers] + `flwr run`), for tests
and benchmarks.

Every process runs in its own session and is terminated by process group at the end (pass or fail); ports are
chosen free; the Flower home (config.toml with the SuperLink connection, installed FABs) lives under `workdir`. Each
SuperNode gets its own policy file written from the recipe (the caller plays every node's owner) and, with
`workers=True`, a `pflm node-worker` that keeps torch and the trainer warm between messages.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from pflm.config import load_recipe
from pflm.errors import PflmError
from pflm.flower.policy import write_node_policy

APP = Path(__file__).resolve().parent / "app"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ready, proc: subprocess.Popen, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise PflmError(f"{what} exited with {proc.returncode}")
        if ready():
            return
        time.sleep(0.2)
    raise PflmError(f"{what} not ready after {timeout:.0f} s")


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)
    for p in procs:  # children (superexec, clientapp) share the process group
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class WireTap:
    """A TCP relay between the SuperNodes and the SuperLink that records every byte the nodes send (what the
    SuperLink, or anyone on the wire under --insecure, receives from them)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream = upstream_port
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._lock = threading.Lock()
        self._sent: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def sent(self) -> bytes:
        with self._lock:
            return b"".join(self._sent)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:  # the SuperLink is not up (yet, or any more): the node retries, as without a tap
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, up, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(up, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, record: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if record:
                    with self._lock:
                        self._sent.append(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.sock.close()


def deploy(recipe: str | Path, overrides: list[str], n_nodes: int, workdir: Path, workers: bool = False,
           deadline_s: float = 600.0, node_threads: int = 1, tap: bool = False) -> Path:
    """Run the recipe on a loopback SuperLink with `n_nodes` SuperNodes; return its run dir (summary written).
    With `tap`, the nodes talk to the SuperLink through a `WireTap` whose recorded bytes are written to
    `workdir/wire_from_nodes.bin`."""
    workdir = Path(workdir)
    link_port = free_port()
    home, logs = workdir / "flwr_home", workdir / "logs"
    home.mkdir(parents=True)
    logs.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    app = workdir / "app"
    shutil.copytree(APP, app)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", FLWR_HOME=str(home),
               FLWR_TELEMETRY_ENABLED="0", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cfg = load_recipe(str(recipe), overrides)
    if not (Path(cfg.output_dir).is_absolute() and Path(cfg.data.dir).is_absolute()):
        raise PflmError("a loopback deployment needs absolute output_dir and data.dir (the apps run elsewhere)")
    policy = write_node_policy(cfg, workdir / "node_policy.json")
    procs: list[subprocess.Popen] = []
    wire = None

    def spawn(name: str, *args: str) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen([*args], env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        procs.append(p)
        return p

    def tails() -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}" for f in sorted(logs.glob("*.log")))

    try:
        link = spawn("superlink", str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                     str(link_port), "--disable-runtime-dependency-installation")
        _wait(lambda: _listening(link_port), link, 60, "flower-superlink")
        node_link = link_port
        if tap:
            wire = WireTap(link_port)
            node_link = wire.port
        for i in range(n_nodes):
            node_config = f"partition-id={i} num-partitions={n_nodes} policy='{policy}' threads={node_threads}"
            if workers:
                sock = workdir / f"worker{i}.sock"
                w = spawn(f"worker{i}", sys.executable, "-m", "pflm", "node-worker", "--socket", str(sock),
                          "--threads", str(node_threads))
                _wait(lambda s=sock: s.exists() and Path(f"{s}.key").exists(), w, 120, "pflm node-worker")
                node_config += f" worker='{sock}'"
            spawn(f"supernode{i}", str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{node_link}",
                  "--port", str(free_port()), "--node-config", node_config)
        run_config = f"recipe='{Path(recipe).resolve()}' overrides='{' '.join(overrides)}' node-wait=120.0"
        started = subprocess.run([str(BIN / "flwr"), "run", str(app), "loopback", "--run-config", run_config],
                                 env=env, cwd=workdir, capture_output=True, text=True, timeout=120)
        if started.returncode != 0 or "Successfully started run" not in started.stdout:
            raise PflmError(f"flwr run failed: {started.stdout}{started.stderr}")
        run_dir = cfg.run_dir
        end = time.monotonic() + deadline_s
        while not (run_dir / "summary.json").exists():
            if time.monotonic() > end:
                raise PflmError(f"no summary after {deadline_s:.0f} s\n{tails()}")
            if any(p.poll() is not None for p in procs):
                raise PflmError(f"a Flower process died\n{tails()}")
            time.sleep(0.5)
    finally:
        stop(procs)
        if wire is not None:
            wire.close()
            (workdir / "wire_from_nodes.bin").write_bytes(wire.sent())
    return run_dir
