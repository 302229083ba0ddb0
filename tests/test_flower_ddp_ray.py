"""Distributed DP on Flower's Ray simulation engine: the ClientApp actors run the device half (issue 18).

The LoopGrid (tests/test_flower_ddp.py) and a loopback deployment (tests/test_flower_ddp_deploy.py) cover the
protocol and the attacks; this checks the remaining backend: `pflm train backend=flower` with
`aggregation.kind=secure privacy.mechanism=distributed_skellam` (Ray actors, the node policy written from the
recipe by `run_flower`) releases the in-process distributed run's model bit for bit in reproducible mode, with the
same ε and the same accountant history.
"""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from pflm.config import load_recipe
from pflm.flower.run import run_flower
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"
DDP = {"privacy.mechanism": "distributed_skellam", "aggregation.kind": "secure", "privacy.target_epsilon": 6,
       "privacy.noise_multiplier": "null", "privacy.population": 100000, "privacy.noise_cohort": 500,
       "server.sampling": "poisson", "server.cohort_size": 9, "server.rounds": 2, "privacy.distributed.bits": 20,
       "privacy.distributed.k_stddevs": 6, "flower.num_supernodes": 3, "flower.cpus_per_client": 1}


def test_ray_simulation_with_distributed_skellam_matches_the_inprocess_run(synthetic_data, tmp_path):
    ref_cfg = load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "inproc"), **DDP))
    ref = Simulator(ref_cfg).run(progress=False)
    fl_cfg = load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "ray"), backend="flower", **DDP))
    got = run_flower(fl_cfg, progress=False)

    a = load_file(str(fl_cfg.run_dir / "model.safetensors"))
    b = load_file(str(ref_cfg.run_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert got["rounds"] == ref["rounds"] == 2
    assert got["epsilon"] == ref["epsilon"] > 0
    s_fl = json.loads((fl_cfg.run_dir / "summary.json").read_text())
    s_ip = json.loads((ref_cfg.run_dir / "summary.json").read_text())
    assert s_fl["recipe"]["backend"] == "flower" and s_fl["mechanism"] == "distributed_skellam"
    assert s_fl["distributed_dp"]["history"] == s_ip["distributed_dp"]["history"]
    m = [json.loads(x) for x in (fl_cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in m] == [0, 1] and all(r["noise_std_sum"] > 0 for r in m)
