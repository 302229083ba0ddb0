"""A trained run scores sentences for rescoring: normalised like training, batched, OOV-safe."""

from __future__ import annotations

import math

from pflm.config import load_recipe
from pflm.evaluation.lm_scorer import load_scorer
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides


def test_run_scorer_prefers_in_domain_word_order(synthetic_data, tmp_path):
    cfg = load_recipe("recipes/tiny_synthetic.yaml", tiny_overrides(synthetic_data, str(tmp_path), **{
        "server.rounds": 12, "server.cohort_size": 20, "device.lr": 1.0}))
    Simulator(cfg).run(progress=False)
    scorer = load_scorer(str(cfg.run_dir), batch_size=2)
    assert scorer.normalize("Set an ALARM, for seven!") == "set an alarm for seven"
    good = ["set an alarm for seven", "call mom", "what's the weather"]
    bad = ["seven for alarm an set", "mom call", "weather the what's"]
    g, b = scorer.score(good), scorer.score(bad)
    assert all(math.isfinite(x) and x < 0 for x in g + b)
    assert sum(g) > sum(b)
    # batching does not change scores; unknown words are scored (as <unk>), never dropped
    assert abs(scorer.score(good[:1])[0] - g[0]) < 1e-4
    oov = scorer.score(["call zzzqqq"])[0]
    assert math.isfinite(oov)
