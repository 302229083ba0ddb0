"""Flower simulation backend (Ray) vs the in-process simulator: same recipe and seed, noise off → same model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pflm.config import load_recipe
from pflm.flower.run import run_flower
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"


def test_flower_simulation_matches_inprocess(synthetic_data, tmp_path):
    extra = {
        "server.rounds": 2,
        "server.cohort_size": 6,
        "peu.mode": "sampled",  # a different set of embedding rows every round travels over Flower
        "peu.k": 48,
        "privacy.noise_multiplier": 0.0,
        "privacy.clip_bound": 0.3,
        "flower.num_supernodes": 3,
        "flower.cpus_per_client": 1,
        "server.sampling": "fixed",  # not private: every round trains exactly 6 users
    }
    ref_cfg = load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "inproc"), **extra))
    ref = Simulator(ref_cfg).run(progress=False)
    fl_cfg = load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "flower"), backend="flower", **extra))
    got = run_flower(fl_cfg, progress=False)

    assert got["rounds"] == ref["rounds"] == 2
    assert set(got) == set(ref)
    assert got["val_perplexity"] == pytest.approx(ref["val_perplexity"], rel=1e-5)
    a = load_file(str(fl_cfg.run_dir / "model.safetensors"))
    b = load_file(str(ref_cfg.run_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    for f in ("summary.json", "metrics.jsonl", "checkpoint-000002.safetensors", "recipe.json", "tokenizer.model"):
        assert (fl_cfg.run_dir / f).exists(), f
    assert json.loads((fl_cfg.run_dir / "summary.json").read_text())["recipe"]["backend"] == "flower"

    m_fl = [json.loads(x) for x in (fl_cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    m_ip = [json.loads(x) for x in (ref_cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in m_fl] == [0, 1]
    for x, y in zip(m_fl, m_ip):
        assert x["contributors"] == y["contributors"] == 6
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-6)
        assert x["update_norm"] == pytest.approx(y["update_norm"], rel=1e-5)
        assert x["fraction_clipped"] == y["fraction_clipped"]


def test_flower_simulation_secure_aggregation_on_the_nodes(synthetic_data, tmp_path):
    """aggregation=secure on Ray: the ClientApp actors run the device half (state in context.state between the
    stage messages); the model equals the in-process secure run's."""
    extra = {"server.rounds": 1, "server.cohort_size": 6, "flower.num_supernodes": 3, "flower.cpus_per_client": 1,
             "server.sampling": "fixed", "aggregation.kind": "secure"}
    ref_cfg = load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "inproc"), **extra))
    Simulator(ref_cfg).run(progress=False)
    fl_cfg = load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "flower"), backend="flower", **extra))
    run_flower(fl_cfg, progress=False)
    a = load_file(str(fl_cfg.run_dir / "model.safetensors"))
    b = load_file(str(ref_cfg.run_dir / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    m = [json.loads(x) for x in (fl_cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert m[0]["contributors"] == 6 and m[0]["secagg_survivors"] == 6
