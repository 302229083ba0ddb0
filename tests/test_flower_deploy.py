"""Real Flower deployment on loopback: flower-superlink + 2–3 flower-supernode processes + `flwr run` of pflm's app.

Every process runs in its own session and is terminated by process group at the end (pass or fail); ports are
chosen free; the Flower home (config.toml with the SuperLink connection, installed FABs) is a temp dir.
The trained model must equal the in-process simulator's for the same recipe and seed.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pflm.config import load_recipe
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_synthetic.yaml"
APP = ROOT / "pflm" / "flower" / "app"
BIN = Path(sys.executable).parent
DEADLINE_S = 300  # generous for a loaded 2-core machine; a quiet one needs well under a minute


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"process {proc.args[0]} exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _stop(procs: list[subprocess.Popen]) -> None:
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


def _deploy(synthetic_data: str, tmp_path: Path, extra: dict, n_nodes: int) -> Path:
    """Run the recipe on a loopback SuperLink with `n_nodes` SuperNodes; return the run dir (summary written)."""
    link_port, node_ports = _free_port(), [_free_port() for _ in range(n_nodes)]
    home, logs = tmp_path / "flwr_home", tmp_path / "logs"
    home.mkdir()
    logs.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    app = tmp_path / "app"
    shutil.copytree(APP, app)
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", FLWR_HOME=str(home),
               FLWR_TELEMETRY_ENABLED="0", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    out_dir = tmp_path / "runs_flower"
    overrides = tiny_overrides(synthetic_data, str(out_dir), **extra)

    procs: list[subprocess.Popen] = []

    def spawn(name: str, *args: str) -> subprocess.Popen:
        log = open(logs / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        p = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=env, cwd=tmp_path, stdout=log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(p)
        return p

    def tails() -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-1500:]}" for f in sorted(logs.glob("*.log")))

    try:
        link = spawn("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link_port),
                     "--disable-runtime-dependency-installation")
        _wait_port(link_port, link, 60)
        for i, port in enumerate(node_ports):
            spawn(f"supernode{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                  "--port", str(port), "--node-config", f"partition-id={i} num-partitions={n_nodes}")
        run_config = f"recipe='{RECIPE}' overrides='{' '.join(overrides)}' node-wait=120.0"
        started = subprocess.run([str(BIN / "flwr"), "run", str(app), "loopback", "--run-config", run_config],
                                 env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert started.returncode == 0 and "Successfully started run" in started.stdout, started.stdout + started.stderr
        run_dir = out_dir / "tiny_synthetic"
        end = time.monotonic() + DEADLINE_S
        while not (run_dir / "summary.json").exists():
            assert time.monotonic() < end, f"no summary after {DEADLINE_S} s\n{tails()}"
            assert all(p.poll() is None for p in procs), f"a Flower process died\n{tails()}"
            time.sleep(1)
    finally:
        _stop(procs)
    assert all(p.poll() is not None for p in procs)
    return run_dir


def _same_model_as_inprocess(synthetic_data: str, tmp_path: Path, extra: dict, run_dir: Path) -> None:
    ref_cfg = load_recipe(str(RECIPE), tiny_overrides(synthetic_data, str(tmp_path / "runs_inproc"), **extra))
    Simulator(ref_cfg).run(progress=False)
    a = load_file(str(run_dir / "model.safetensors"))
    b = load_file(str(ref_cfg.run_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


NO_FLWR = shutil.which("flower-superlink", path=str(BIN)) is None


@pytest.mark.skipif(NO_FLWR, reason="flwr CLI not installed in this env")
def test_loopback_deployment_matches_inprocess(synthetic_data, tmp_path):
    # one round: multi-round state is covered by test_flower_sim/test_flower_server; each round here costs a
    # fresh flwr-clientapp process (torch import) per SuperNode
    extra = {"server.rounds": 1, "server.cohort_size": 5, "flower.num_supernodes": 2, "server.sampling": "fixed"}
    run_dir = _deploy(synthetic_data, tmp_path, extra, 2)
    _same_model_as_inprocess(synthetic_data, tmp_path, extra, run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"contributors": 5' in lines[-1]


@pytest.mark.skipif(NO_FLWR, reason="flwr CLI not installed in this env")
def test_loopback_deployment_secure_aggregation_on_the_nodes(synthetic_data, tmp_path):
    """3 SuperNodes run the device half of SecAgg (each stage in a fresh flwr-clientapp process: the device
    secrets survive between stages only in the node's context.state); same model as the in-process secure run."""
    extra = {"server.rounds": 1, "server.cohort_size": 6, "flower.num_supernodes": 3, "server.sampling": "fixed",
             "aggregation.kind": "secure"}
    run_dir = _deploy(synthetic_data, tmp_path, extra, 3)
    _same_model_as_inprocess(synthetic_data, tmp_path, extra, run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"contributors": 6' in lines[-1] and '"secagg_survivors": 6.0' in lines[-1]
