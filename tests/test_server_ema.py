"""Iterate averaging (`server.ema_decay`): the released model is the EMA of the server iterates, computed from
the releases only — it never feeds back into training, the ε is unchanged and a resumed run averages exactly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pflm.config import load_recipe
from pflm.errors import PflmError
from pflm.simulation.simulator import Simulator
from tests.conftest import crash_at_round, tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"
DP = {"privacy.noise_multiplier": 0.8, "server.optimizer": "fedadam", "server.lr": 0.05, "peu.mode": "sampled",
      "peu.k": 50, "server.checkpoint_every": 1, "server.rounds": 5}


def _sim(data, out, **extra):
    return Simulator(load_recipe(RECIPE, tiny_overrides(data, out, **DP, **extra)))


def test_ema_is_the_average_of_the_released_iterates_and_training_is_unchanged(synthetic_data, tmp_path):
    plain = _sim(synthetic_data, str(tmp_path / "plain"))
    iterates = [{k: v.clone() for k, v in plain.server.model.state_dict().items()}]
    real_finish = plain.server.finish_round

    def record(plan, agg):
        out = real_finish(plan, agg)
        iterates.append({k: v.clone() for k, v in plain.server.model.state_dict().items()})
        return out

    plain.server.finish_round = record
    s_plain = plain.run(progress=False)
    s_ema = _sim(synthetic_data, str(tmp_path / "ema"), **{"server.ema_decay": 0.5}).run(progress=False)

    run_plain, run_ema = tmp_path / "plain" / "tiny_synthetic", tmp_path / "ema" / "tiny_synthetic"
    last, released = load_file(str(run_ema / "model-last-iterate.safetensors")), load_file(str(run_ema / "model.safetensors"))
    for k, v in load_file(str(run_plain / "model.safetensors")).items():  # devices trained from the same iterates
        assert torch.equal(last[k], v), k
    assert s_ema["epsilon"] == s_plain["epsilon"]  # post-processing: no extra privacy cost
    assert not (run_plain / "model-last-iterate.safetensors").exists()

    # the hand-computed EMA with the documented warm-up decay min(0.5, (1+t)/(10+t))
    ema = {k: v.clone() for k, v in iterates[0].items()}
    for t, it in enumerate(iterates[1:]):
        d = min(0.5, (1 + t) / (10 + t))
        ema = {k: d * ema[k] + (1 - d) * it[k] for k in ema}
    assert len(iterates) == 6
    moved = 0
    for k, v in released.items():
        torch.testing.assert_close(v, ema[k], rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(v, last[k]))
    assert moved > 0  # the released model really is an average, not the last iterate
    assert s_ema["last_iterate_test_word_perplexity"] == pytest.approx(s_plain["test_word_perplexity"], rel=1e-6)
    rows = [json.loads(x) for x in (run_ema / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert "last_iterate_val_word_perplexity" in rows[-1] and "val_word_perplexity" in rows[-1]


def test_ema_resumes_exactly(synthetic_data, tmp_path, monkeypatch):
    extra = {"server.ema_decay": 0.7}
    _sim(synthetic_data, str(tmp_path / "a"), **extra).run(progress=False)
    crashed = _sim(synthetic_data, str(tmp_path / "b"), **extra)
    crash_at_round(crashed, monkeypatch, 3)
    _sim(synthetic_data, str(tmp_path / "b"), **extra).run(progress=False)
    for name in ("model.safetensors", "model-last-iterate.safetensors"):
        a = load_file(str(tmp_path / "a" / "tiny_synthetic" / name))
        b = load_file(str(tmp_path / "b" / "tiny_synthetic" / name))
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_ema_cannot_be_switched_on_mid_run(synthetic_data, tmp_path, monkeypatch):
    crash_at_round(_sim(synthetic_data, str(tmp_path)), monkeypatch, 2)
    with pytest.raises(PflmError, match="server.ema_decay"):
        _sim(synthetic_data, str(tmp_path), **{"server.ema_decay": 0.9})


def test_a_run_started_before_the_key_existed_still_resumes(synthetic_data, tmp_path, monkeypatch):
    crash_at_round(_sim(synthetic_data, str(tmp_path)), monkeypatch, 2)
    path = tmp_path / "tiny_synthetic" / "recipe.json"
    recipe = json.loads(path.read_text())
    del recipe["server"]["ema_decay"]  # as written by pflm before server.ema_decay existed
    path.write_text(json.dumps(recipe))
    assert _sim(synthetic_data, str(tmp_path)).run(progress=False)["rounds"] == 5


@pytest.mark.parametrize("extra, msg", [
    ({"server.ema_decay": 1.0}, "server.ema_decay must be in"),
    ({"server.ema_decay": -0.1}, "server.ema_decay must be in"),
    ({"server.ema_decay": 0.9, "server.lora_merge_every": 5, "model.lora.rank": 4}, "LoRA folds"),
])
def test_bad_ema_settings_are_refused(synthetic_data, tmp_path, extra, msg):
    with pytest.raises(PflmError, match=msg):
        load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path), **DP, **extra))
