"""Real Flower deployment on loopback: flower-superlink + 2–3 flower-supernode processes + `flwr run` of pflm's app.

The processes are started and stopped by `pflm.flower.loopback.deploy`. The trained model must equal the in-process
simulator's for the same recipe and seed, with and without warm node workers (`pflm node-worker`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pflm.config import load_recipe
from pflm.device.update import device_update
from pflm.secure_random import subkey
from pflm.flower.loopback import deploy
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "tiny_synthetic.yaml"
BIN = Path(sys.executable).parent
DEADLINE_S = 300  # generous for a loaded 2-core machine; a quiet one needs well under a minute


def _deploy(synthetic_data: str, tmp_path: Path, extra: dict, n_nodes: int, workers: bool = False) -> Path:
    """Run the recipe on a loopback SuperLink with `n_nodes` SuperNodes behind a wire tap; return the run dir."""
    overrides = tiny_overrides(synthetic_data, str(tmp_path / "runs_flower"), **extra)
    return deploy(RECIPE, overrides, n_nodes, tmp_path / "deploy", workers=workers, deadline_s=DEADLINE_S, tap=True)


def _round0_update_windows(synthetic_data: str, tmp_path: Path, extra: dict) -> dict[int, bytes]:
    """Each round-0 cohort user's clipped update as the node computes it (reproducible keys), as a 64-byte float32
    window of non-zero coordinates: what a wire sniffer would look for."""
    cfg = load_recipe(str(RECIPE), tiny_overrides(synthetic_data, str(tmp_path / "probe"),
                                                  **{**extra, "aggregation.kind": "plain"}))
    sim = Simulator(cfg)
    plan = sim.server.plan_round(0)
    tr = sim.fanout.trainer
    tr.load_round(0, plan.device_state, plan.rows)
    out = {}
    for u in plan.cohort:
        key = subkey(sim.run_key, "device", 0, u)
        _, vec, _ = device_update(tr, sim.server.postprocessors, plan.ctx, u, sim.fd.user_tokens("train", u), key)
        x = vec.numpy().astype("<f4")
        assert float(np.linalg.norm(x)) < 0.9 * plan.ctx.clip_bound or extra.get("aggregation.kind") != "secure"
        nz = np.flatnonzero(np.convolve(x != 0, np.ones(16), "valid") == 16)
        out[u] = x[nz[len(nz) // 2]: nz[len(nz) // 2] + 16].tobytes()
    return out


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
    # one round: multi-round state is covered by test_flower_sim/test_flower_server; the nodes forward their
    # train tasks to warm `pflm node-worker`s (the secure test below trains in each message's own process)
    extra = {"server.rounds": 1, "server.cohort_size": 5, "flower.num_supernodes": 2, "server.sampling": "fixed"}
    run_dir = _deploy(synthetic_data, tmp_path, extra, 2, workers=True)
    _same_model_as_inprocess(synthetic_data, tmp_path, extra, run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"contributors": 5' in lines[-1]
    # without secure aggregation the operator (and the wire, under --insecure) sees every clipped update: the tap works
    wire = (tmp_path / "deploy" / "wire_from_nodes.bin").read_bytes()
    windows = _round0_update_windows(synthetic_data, tmp_path, extra)
    assert len(windows) == 5 and all(w in wire for w in windows.values())


@pytest.mark.skipif(NO_FLWR, reason="flwr CLI not installed in this env")
def test_loopback_deployment_secure_aggregation_on_the_nodes(synthetic_data, tmp_path):
    """3 SuperNodes run the device half of SecAgg (each stage in a fresh flwr-clientapp process: the device
    secrets survive between stages only in the node's context.state); same model as the in-process secure run."""
    # clip bound far above the update norms: nothing is clipped or shrunk for the rounding slack, so a node that
    # leaked its update in plaintext would send exactly the bytes the sniffer looks for
    extra = {"server.rounds": 1, "server.cohort_size": 6, "flower.num_supernodes": 3, "server.sampling": "fixed",
             "aggregation.kind": "secure", "privacy.clip_bound": 50}
    run_dir = _deploy(synthetic_data, tmp_path, extra, 3)
    _same_model_as_inprocess(synthetic_data, tmp_path, extra, run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"contributors": 6' in lines[-1] and '"secagg_survivors": 6.0' in lines[-1]
    # attack: sniff every byte the nodes send the SuperLink and look for any user's clipped update: not there
    wire = (tmp_path / "deploy" / "wire_from_nodes.bin").read_bytes()
    windows = _round0_update_windows(synthetic_data, tmp_path, extra)
    assert len(windows) == 6 and len(wire) > 6 * 4 * 16
    assert not any(w in wire for w in windows.values())
