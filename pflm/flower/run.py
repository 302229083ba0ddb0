"""`pflm train RECIPE backend=flower`: the recipe on Flower's simulation engine (Ray), returning the usual summary.

The ServerApp runs in this process (a thread of Flower's simulation runtime) and the ClientApps run in Ray
actors, `flower.num_supernodes` virtual SuperNodes sharing `flower.cpus_per_client` CPUs each. Ray is started
small (the machine's CPUs, a 300 MB object store unless PFLM_RAY_OBJECT_STORE_MB says otherwise) and without
its dashboard; Flower's telemetry is switched off. In a simulation one person runs the server and every node, so
the nodes' trusted policy (`pflm.flower.policy`) is written from the recipe itself and handed to them through
$PFLM_NODE_POLICY (Ray's local workers inherit this process's environment).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from pflm.config import RecipeConfig
from pflm.errors import ConfigError, PflmError

OBJECT_STORE_ENV = "PFLM_RAY_OBJECT_STORE_MB"


def backend_config(cfg: RecipeConfig) -> dict:
    """Flower's Ray backend settings for the recipe's `flower` section."""
    fl = cfg.flower
    if fl.num_supernodes < 1:
        raise ConfigError("flower.num_supernodes must be >= 1")
    if not fl.cpus_per_client > 0:
        raise ConfigError("flower.cpus_per_client must be > 0 (e.g. 1)")
    cpus = os.cpu_count() or 1
    if fl.cpus_per_client > cpus:
        raise ConfigError(f"flower.cpus_per_client={fl.cpus_per_client:g} exceeds this machine's {cpus} CPUs; lower it")
    store_mb = int(os.environ.get(OBJECT_STORE_ENV, "300"))
    return {
        "client_resources": {"num_cpus": float(fl.cpus_per_client), "num_gpus": 0.0},
        "init_args": {
            "num_cpus": cpus,
            "num_gpus": 0,
            "object_store_memory": store_mb * 1024 * 1024,
            "include_dashboard": False,
            "logging_level": "error",
            "log_to_driver": True,
        },
    }


def run_flower(cfg: RecipeConfig, progress: bool = True) -> dict:
    """Train `cfg` on Flower's simulation runtime; return the same summary dict as `Simulator.run`."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # flwr has its own console handler; a root handler installed by a dependency would print every DEBUG line twice
    logging.getLogger("flwr").propagate = False
    from flwr.simulation import run_simulation

    from pflm.flower.client_app import app as client_app
    from pflm.flower.server_app import build_server_app

    from pflm.flower.policy import POLICY_ENV, write_node_policy

    summary: dict = {}
    server_app = build_server_app(cfg, result=summary, progress=progress)
    previous = os.environ.get(POLICY_ENV)
    with tempfile.TemporaryDirectory(prefix="pflm-node-policy-") as tmp:
        os.environ[POLICY_ENV] = str(write_node_policy(cfg, Path(tmp) / "policy.json"))
        try:
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=cfg.flower.num_supernodes,
                backend_name="ray",
                backend_config=backend_config(cfg),
            )
        finally:
            if previous is None:
                os.environ.pop(POLICY_ENV, None)
            else:
                os.environ[POLICY_ENV] = previous
    if not summary:
        raise PflmError("the Flower simulation ended without finishing the run; see the Flower log above")
    return summary
