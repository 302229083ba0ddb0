"""Devices trained several at a time give exactly the model that one-at-a-time training gives."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from pflm.config import load_recipe
from pflm.errors import ConfigError
from pflm.runtime import thread_plan
from pflm.device.spec import DeviceSpec
from pflm.simulation.devices import DevicePool
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"


def _final_state(data: str, out: str, **extra) -> tuple[dict[str, torch.Tensor], list[float]]:
    sim = Simulator(load_recipe(RECIPE, tiny_overrides(data, out, **{"server.rounds": 3, "server.cohort_size": 7}, **extra)))
    losses = [sim.run_round(r)["train_loss"] for r in range(3)]
    return {k: v.clone() for k, v in sim.server.model.state_dict().items()}, losses


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"privacy.noise_multiplier": 0.5, "peu.mode": "sampled", "peu.k": 40, "server.optimizer": "fedadam", "server.lr": 0.05},
        {"aggregation": "secure", "aggregation.secagg.neighbours": 4},
        {"dpsgd.enabled": "true", "dpsgd.noise_multiplier": 0.5, "dpsgd.grad_sample_mode": "hooks", "model.lora.rank": 4,
         "peu.mode": "topk", "peu.k": 60, "device.loss": "nce", "device.num_samples": 16},
    ],
    ids=["plain", "dp-peu-fedadam", "secagg", "dpsgd-lora-nce"],
)
def test_parallel_devices_equal_sequential(synthetic_data, tmp_path, extra) -> None:
    # each device runs on one torch thread in both settings, and the server sums in cohort order
    seq, seq_loss = _final_state(synthetic_data, str(tmp_path / "seq"), threads=1, device_workers=1, **extra)
    par, par_loss = _final_state(synthetic_data, str(tmp_path / "par"), threads=3, device_workers=3, **extra)
    assert seq.keys() == par.keys()
    for k in seq:
        assert torch.equal(seq[k], par[k]), k
    assert seq_loss == par_loss


def test_thread_plan_splits_the_cpu_budget() -> None:
    cfg = load_recipe(RECIPE, ["threads=4", "device_workers=2"])
    assert thread_plan(cfg) == (2, 2, 4)
    assert thread_plan(load_recipe(RECIPE, ["threads=3", "device_workers=0"])) == (3, 1, 3)
    assert thread_plan(load_recipe(RECIPE, ["threads=2", "device_workers=1"])) == (1, 2, 2)
    with pytest.raises(ConfigError, match="device_workers"):
        load_recipe(RECIPE, ["device_workers=-1"])


def test_pool_keeps_order_reports_errors_and_runs_concurrently(synthetic_data, tmp_path) -> None:
    cfg = load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path)))
    pool = DevicePool(DeviceSpec.from_recipe(cfg, 300), None, workers=3)
    active, peak, lock = [0], [0], threading.Lock()

    def job(trainer, u: int) -> tuple[int, int]:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.02 * (u % 3))  # later devices often finish first
        with lock:
            active[0] -= 1
        if u == 5:
            raise ValueError("device 5 failed")
        return u * u, id(trainer)

    out = list(pool.map(job, range(10)))
    pool.close()
    assert [u for u, _ in out] == list(range(10))
    assert isinstance(out[5][1], ValueError)
    assert [r[0] for u, r in out if u != 5] == [u * u for u in range(10) if u != 5]
    assert peak[0] > 1 and len({r[1] for u, r in out if u != 5}) > 1  # several trainers worked at once
