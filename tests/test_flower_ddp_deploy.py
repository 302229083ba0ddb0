"""Distributed DP on a real loopback Flower deployment: flower-superlink + 3 flower-supernode processes + `flwr run`.

Each SecAgg stage runs in a fresh flwr-clientapp process on its node, so the device half (rotation, rounding, the
device's own noise share, masking mod 2^w) must survive between stages in the node's context.state only. The
released model must equal the in-process distributed run's (reproducible keys, which the recipe's node policy
allows), and no user's clipped update may cross the wire.
"""

from __future__ import annotations

import pytest

from tests.test_flower_deploy import NO_FLWR, _deploy, _round0_update_windows, _same_model_as_inprocess
from tests.test_flower_ddp import DDP


@pytest.mark.skipif(NO_FLWR, reason="flwr CLI not installed in this env")
def test_loopback_deployment_distributed_dp_on_the_nodes(synthetic_data, tmp_path):
    extra = {**DDP, "server.cohort_size": 8, "flower.num_supernodes": 3, "privacy.noise_cohort": 500}
    run_dir = _deploy(synthetic_data, tmp_path, extra, 3)
    _same_model_as_inprocess(synthetic_data, tmp_path, extra, run_dir)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and '"noise_std_sum"' in lines[0]
    wire = (tmp_path / "deploy" / "wire_from_nodes.bin").read_bytes()
    windows = _round0_update_windows(synthetic_data, tmp_path, {**extra, "privacy.mechanism": "gaussian"})
    assert windows and not any(w in wire for w in windows.values())
