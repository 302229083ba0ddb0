"""Exact resume: a run killed mid-way and restarted ends with the same weights and the same ε."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pflm.config import load_recipe
from pflm.simulation.simulator import Simulator
from tests.conftest import crash_at_round, tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"
DP = {"privacy.noise_multiplier": 0.8, "privacy.adaptive_clipping.enabled": "true", "privacy.adaptive_clipping.count_noise_std": 2.0, "server.optimizer": "fedadam",
      "server.lr": 0.05, "peu.mode": "sampled", "peu.k": 50, "server.checkpoint_every": 1}


def _same_weights(a, b):
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_resume_after_crash_equals_uninterrupted(synthetic_data, tmp_path, monkeypatch):
    ref = Simulator(load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "a"), **DP, **{"server.rounds": 5})))
    ref_summary = ref.run(progress=False)

    crashed = Simulator(load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "b"), **DP, **{"server.rounds": 5})))
    crash_at_round(crashed, monkeypatch, 3)
    resumed = Simulator(load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "b"), **DP, **{"server.rounds": 5})))
    summary = resumed.run(progress=False)
    _same_weights(tmp_path / "a" / "tiny_synthetic", tmp_path / "b" / "tiny_synthetic")
    assert summary["epsilon"] == ref_summary["epsilon"]  # the accountant resumed with the spent budget
    assert summary["final_clip_bound"] == ref_summary["final_clip_bound"]
    rounds = [json.loads(x)["round"] for x in (tmp_path / "b" / "tiny_synthetic" / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(5))


def test_kill_9_then_rerun_gives_same_final_weights(synthetic_data, tmp_path):
    rounds = 14
    args = tiny_overrides(synthetic_data, str(tmp_path / "killed"), **DP, **{"server.rounds": rounds})
    cmd = [sys.executable, "-m", "pflm", "train", RECIPE, *args, "--no-progress"]
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ptr = tmp_path / "killed" / "tiny_synthetic" / "checkpoint.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ptr.exists():
            try:
                if json.loads(ptr.read_text())["round"] >= 3:
                    break
            except ValueError:
                pass
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "run finished before it could be killed; raise the round count"
    done = json.loads(ptr.read_text())["round"]
    assert 3 <= done < rounds
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ref = Simulator(load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "ref"), **DP, **{"server.rounds": rounds})))
    ref_summary = ref.run(progress=False)
    _same_weights(tmp_path / "killed" / "tiny_synthetic", tmp_path / "ref" / "tiny_synthetic")
    summary = json.loads((tmp_path / "killed" / "tiny_synthetic" / "summary.json").read_text())
    assert summary["epsilon"] == ref_summary["epsilon"]


def test_resume_refuses_a_changed_recipe_and_records_allowed_changes(synthetic_data, tmp_path):
    """Issue 22: continuing a run under a different clip bound / lr would make the ε so far describe other settings."""
    from pflm.errors import PflmError

    base = {**DP, "server.rounds": 2}
    Simulator(load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path), **base))).run(progress=False)
    for key, value in (("privacy.clip_bound", 0.5), ("server.lr", 0.1), ("seed", 3)):
        with pytest.raises(PflmError, match=f"different recipe.*{key}.*name=NEW_NAME"):
            Simulator(load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path), **{**base, key: value})))
    more = Simulator(load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path), **{**base, "server.rounds": 3})))
    more.run(progress=False)
    rows = [json.loads(x) for x in (tmp_path / "tiny_synthetic" / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in rows] == [0, 1, 2]
    assert rows[2]["recipe_changes"] == {"server.rounds": [2, 3]}


def test_full_disk_during_a_checkpoint_keeps_the_previous_one(synthetic_data, tmp_path, monkeypatch):
    """Issue 22: ENOSPC while writing a checkpoint: one clear error, the previous checkpoint stays valid, and
    rerunning the same command resumes from it."""
    import errno

    import pflm.driver.checkpoint as ck
    from pflm.errors import PflmError

    args = tiny_overrides(synthetic_data, str(tmp_path), **{**DP, "server.rounds": 4})
    real, calls = ck.save_file, {"n": 0}

    def full_disk(tensors, path):
        calls["n"] += 1
        if calls["n"] == 3:  # the third checkpoint (after round 3) hits a full disk half-way
            with open(path, "wb") as f:
                f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path)

    monkeypatch.setattr(ck, "save_file", full_disk)
    with pytest.raises(PflmError, match="No space left on device.*previous checkpoint is intact"):
        Simulator(load_recipe(RECIPE, args)).run(progress=False)
    run = tmp_path / "tiny_synthetic"
    assert json.loads((run / "checkpoint.json").read_text())["round"] == 2
    assert not list(run.glob(".checkpoint-*.tmp"))
    assert ck.load_checkpoint(run) is not None  # the pointer's file passes its hash check
    monkeypatch.setattr(ck, "save_file", real)
    summary = Simulator(load_recipe(RECIPE, args)).run(progress=False)
    assert summary["rounds"] == 4


def test_short_soak_many_kills_end_like_an_uninterrupted_run(synthetic_data, tmp_path):
    """Issue 22: the short version of scripts/soak.py (the long one is a benchmark, docs/benchmarks.md)."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "scripts"))
    import soak

    report = soak.soak(synthetic_data, tmp_path, rounds=12, kills=3, seed=1)
    assert report["kills"] >= 1, report  # at least one kill landed before the run could finish
    assert report["ok"], report
