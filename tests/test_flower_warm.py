"""The warm node worker (`pflm node-worker`, issue 15): same results as training in the ClientApp, torch-free
ClientApp processes, and a socket only the node's owner can use."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from multiprocessing.connection import Client
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pflm.config import load_recipe
from pflm.errors import PflmError
from pflm.flower.server_app import flower_driver
from pflm.flower.warm import key_path
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides
from tests.test_flower_server import RECIPE, LoopGrid, _cfg, _task_identity, node_policy_file  # noqa: F401 (autouse fixtures)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def worker(tmp_path):
    sock = tmp_path / "w" / "node.sock"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "pflm", "node-worker", "--socket", str(sock), "--threads", "1"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    end = time.monotonic() + 120
    while not (sock.exists() and key_path(sock).exists()):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < end, "node worker did not start"
        time.sleep(0.1)
    yield sock
    proc.kill()
    proc.wait()


class WorkerGrid(LoopGrid):
    """A LoopGrid whose nodes forward their train tasks to the warm worker."""

    def __init__(self, sock, *a, **k) -> None:
        super().__init__(*a, **k)
        for ctx in self.nodes.values():
            ctx.node_config["worker"] = str(sock)


@pytest.mark.parametrize("kind", ["plain", "secure"])
def test_worker_gives_the_inprocess_model(worker, synthetic_data, tmp_path, kind):
    extra = {"aggregation.kind": kind, "device.loss": "sampled_softmax", "device.num_samples": 32}
    cfg = _cfg(synthetic_data, tmp_path / "fl", **extra)
    flower_driver(cfg, WorkerGrid(worker, [0, 1, 2], 3)).run(progress=False)
    extra.update({"server.rounds": 2, "server.cohort_size": 8, "server.sampling": "fixed"})
    ref_cfg = load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "inproc"), **extra))
    Simulator(ref_cfg).run(progress=False)
    a, b = load_file(str(cfg.run_dir / "model.safetensors")), load_file(str(ref_cfg.run_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)  # as test_loop_grid_matches_inprocess


def test_worker_socket_is_the_owners_only(worker):
    """Attack: another local process connects without the key (or with a guessed one): refused before anything is
    unpickled, and the worker keeps serving its node."""
    from multiprocessing import AuthenticationError

    assert stat.S_IMODE(key_path(worker).stat().st_mode) == 0o600
    assert stat.S_IMODE(worker.stat().st_mode) & 0o077 == 0
    with pytest.raises((AuthenticationError, EOFError, ConnectionError)):
        Client(str(worker), family="AF_UNIX", authkey=os.urandom(32))
    c = Client(str(worker), family="AF_UNIX", authkey=key_path(worker).read_bytes())  # the node's own ClientApp
    c.send({"task": None, "policy": {}, "data_dir": None})
    assert c.recv()[0] == "error"  # a bad request fails that message only
    c.close()


def test_clientapp_with_a_worker_never_loads_torch():
    code = ("import sys; import pflm.flower.client_app as app, pflm.flower.tasks, pflm.flower.warm, pflm.flower.secure_node;"
            "from flwr.app import Context, RecordDict;"
            "ctx = Context(run_id=1, node_id=1, node_config={'worker': '/x.sock', 'threads': 2}, state=RecordDict(),"
            " run_config={});"
            "assert app._node_settings(ctx, 2, trains_here=False)[0] == 2;"
            "assert 'torch' not in sys.modules, 'torch loaded'")
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))


def test_missing_worker_is_one_clear_error(tmp_path):
    from pflm.flower.policy import NodePolicy
    from pflm.flower.warm import remote_updates

    with pytest.raises(PflmError, match="pflm node-worker --socket"):
        next(remote_updates(str(tmp_path / "none.sock"), None, NodePolicy(), None))
