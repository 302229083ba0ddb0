"""Budget enforcement in a run: stop cleanly before overspending; a resume never resets the spent budget."""

from __future__ import annotations

import json

from opacus.accountants import RDPAccountant

from pflm.config import load_recipe
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"


def test_extending_a_finished_run_stops_before_exceeding_target(synthetic_data, tmp_path):
    common = {"privacy.target_epsilon": 3.0, "privacy.delta": 1e-5, "server.checkpoint_every": 1}
    first = Simulator(load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path), **common, **{"server.rounds": 3})))
    s1 = first.run(progress=False)
    assert s1["stop_reason"] is None and s1["rounds"] == 3
    assert s1["epsilon"] <= 3.0
    sigma1 = s1["noise_multiplier"]

    # Asking for 10 rounds recalibrates σ for 10 rounds, but 3 rounds were already spent at the smaller σ1:
    # the guard must stop before the round that would cross ε = 3, and keep the old rounds' cost.
    second = Simulator(load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path), **common, **{"server.rounds": 10})))
    s2 = second.run(progress=False)
    assert s2["stop_reason"] and "stopping before round" in s2["stop_reason"]
    assert 3 <= s2["rounds"] < 10
    assert s2["epsilon"] <= 3.0
    q = 5 / second.population
    acc = RDPAccountant()
    for _ in range(3):
        acc.step(noise_multiplier=sigma1, sample_rate=q)
    for _ in range(s2["rounds"] - 3):
        acc.step(noise_multiplier=s2["noise_multiplier"], sample_rate=q)
    assert abs(acc.get_epsilon(delta=1e-5) - s2["epsilon"]) < 1e-9
    # one more round would have exceeded the target
    acc.step(noise_multiplier=s2["noise_multiplier"], sample_rate=q)
    assert acc.get_epsilon(delta=1e-5) > 3.0
    ptr = json.loads((tmp_path / "tiny_synthetic" / "checkpoint.json").read_text())
    assert ptr["round"] == s2["rounds"] and "stop_reason" in ptr["meta"]
