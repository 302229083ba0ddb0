"""Simulated device faults (issue 22): crashed, late and corrupt devices are dropped and counted, the round goes
on, and the privacy accounting is exactly that of a fault-free run of the same cohorts."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pflm.config import load_recipe
from pflm.errors import ConfigError, PflmError
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"
BASE = {"privacy.noise_multiplier": 1.0, "server.rounds": 4, "server.cohort_size": 12, "diagnostics": "true"}
FAULTS = {"faults.device_crash": 0.2, "faults.straggler": 0.2, "faults.corrupt_update": 0.3}


def _run(data, out, **kw):
    sim = Simulator(load_recipe(RECIPE, tiny_overrides(data, str(out), **{**BASE, **kw})))
    return sim, sim.run(progress=False)


def _diag(out) -> list[dict]:
    return [json.loads(x) for x in (out / "tiny_synthetic" / "diagnostics.jsonl").read_text().splitlines()[1:]]


def test_faulty_devices_are_dropped_counted_and_accounting_is_unchanged(synthetic_data, tmp_path):
    _, clean = _run(synthetic_data, tmp_path / "clean")
    sim, faulty = _run(synthetic_data, tmp_path / "faulty", **FAULTS)
    assert faulty["rounds"] == 4 and faulty["epsilon"] == clean["epsilon"]
    rows = _diag(tmp_path / "faulty")
    counts = {k: sum(r.get(f"faults_{k}", 0) for r in rows) for k in ("device_crash", "straggler", "corrupt_update")}
    assert all(v > 0 for v in counts.values()), counts  # every kind happened (else the test proves nothing)
    assert sum(r.get("rejected_uploads", 0) for r in rows) == counts["corrupt_update"]  # the server caught each one
    for r in rows:
        dropped = r.get("faults_device_crash", 0) + r.get("faults_straggler", 0) + r.get("faults_corrupt_update", 0)
        assert r["contributors"] == r["cohort"] - dropped - r["nonfinite_dropped"]
    clean_std = [json.loads(x)["noise_std_sum"] for x in (tmp_path / "clean" / "tiny_synthetic" / "metrics.jsonl").read_text().splitlines()]
    faulty_std = [json.loads(x)["noise_std_sum"] for x in (tmp_path / "faulty" / "tiny_synthetic" / "metrics.jsonl").read_text().splitlines()]
    assert faulty_std == clean_std  # dropped devices never shrink the noise
    assert all(bool(torch.isfinite(p).all()) for p in sim.server.model.parameters())
    assert math.isfinite(faulty["test_perplexity"])


def test_corrupt_faults_need_plain_aggregation(synthetic_data, tmp_path):
    with pytest.raises(ConfigError, match="aggregation=plain"):
        _run(synthetic_data, tmp_path, **{"faults.corrupt_update": 0.1, "aggregation.kind": "secure"})


def test_a_real_device_bug_stops_the_run_with_one_line_and_a_traceback_log(synthetic_data, tmp_path, monkeypatch):
    sim = Simulator(load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path), **BASE)))

    def broken(*args, **kwargs):
        raise KeyError("a bug in device code")

    monkeypatch.setattr(sim.fanout.trainer, "train", broken)
    with pytest.raises(PflmError, match=r"failed in round 0 \(KeyError.*traceback in .*error.log"):
        sim.run(progress=False)
    assert "KeyError" in (tmp_path / "tiny_synthetic" / "error.log").read_text()
