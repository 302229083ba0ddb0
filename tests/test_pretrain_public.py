"""Public pretraining (`pflm pretrain`) and starting a federated run from it; weights without public provenance are refused."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pflm.cli import main
from pflm.config import load_recipe
from pflm.data.corpora import public_text
from pflm.model.factory import build_model
from pflm.errors import ConfigError
from pflm.model.pretrained import load_pretrained, manifest_tokenizer_sha256
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

SMALL = ["model.embedding_dim=16", "model.hidden_dim=32"]


def test_public_corpus_is_the_packaged_dialogues():
    rows = list(public_text.iter_rows())
    assert len(rows) > 4000 and {"greetings", "conversations"} <= {u for u, _ in rows}
    assert "BSD" in public_text.LICENSE


@pytest.fixture(scope="module")
def pretrained(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "pretrained"
    rc = main(["pretrain", "recipes/tiny_synthetic.yaml", *SMALL, "--data", synthetic_data, "--out", str(out),
               "--epochs", "1", "--threads", "1",
               "--max-sentences", "1500"])
    assert rc == 0
    return out


def test_pretrain_writes_public_provenance_and_learns(pretrained, synthetic_data):
    info = json.loads((pretrained / "pretrain.json").read_text())
    assert info["data"] == "public" and info["corpus"] == "chatterbot"
    assert info["tokenizer_sha256"] == manifest_tokenizer_sha256(synthetic_data)
    ppl = [h["heldout_public_perplexity"] for h in info["history"]]
    assert ppl[-1] < ppl[0]  # one epoch on public text lowers held-out public perplexity


def test_federated_run_starts_from_the_pretrained_weights(pretrained, synthetic_data, tmp_path):
    weights = pretrained / "model.safetensors"
    cfg = load_recipe("recipes/tiny_synthetic.yaml", tiny_overrides(synthetic_data, str(tmp_path)) + SMALL)
    model = build_model(cfg.model, 300)
    load_pretrained(model, weights, manifest_tokenizer_sha256(synthetic_data))
    state = load_file(str(weights))
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    cfg = load_recipe("recipes/tiny_synthetic.yaml",
                      tiny_overrides(synthetic_data, str(tmp_path), **{"server.rounds": 1}) + SMALL
                      + [f"server.init_from={weights}"])
    Simulator(cfg).run(progress=False)  # the whole pipeline accepts it


def test_weights_without_public_provenance_are_refused(pretrained, synthetic_data, tmp_path):
    """An operator must not smuggle a model fitted to the users' own text in as the starting point."""
    weights = pretrained / "model.safetensors"
    cfg = load_recipe("recipes/tiny_synthetic.yaml", tiny_overrides(synthetic_data, str(tmp_path)) + SMALL)
    model = build_model(cfg.model, 300)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(weights.read_bytes())
    with pytest.raises(ConfigError, match="pretrain.json"):
        load_pretrained(model, fake / "model.safetensors", None)
    info = json.loads((pretrained / "pretrain.json").read_text())
    (fake / "pretrain.json").write_text(json.dumps({**info, "data": "private"}))
    with pytest.raises(ConfigError, match="public data"):
        load_pretrained(model, fake / "model.safetensors", None)
    with pytest.raises(ConfigError, match="another tokenizer"):
        load_pretrained(model, weights, "0" * 64)
    bigger = build_model(load_recipe("recipes/tiny_synthetic.yaml", ["model.embedding_dim=24"]).model, 300)
    with pytest.raises(ConfigError, match="does not match"):
        load_pretrained(bigger, weights, None)


def test_pretrained_output_is_rescorable_and_labelled_public(pretrained):
    """`pflm rescore --compare OUT` scores the public LM; its rows say PUBLIC, never DP or a private run."""
    from pflm.evaluation.lm_scorer import load_scorer
    from pflm.evaluation.rescore_systems import privacy_label

    scorer = load_scorer(str(pretrained))
    a, b = scorer.score(["hello how are you", "you are how hello"])
    assert a > b  # it learned public word order
    assert privacy_label(pretrained).startswith("PUBLIC data only")
    assert json.loads((pretrained / "data_manifest.json").read_text())["privacy"]["vocabulary"] == "public"


def test_missing_starting_weights_are_refused_before_anything_is_written(synthetic_data, tmp_path):
    """`server.init_from` pointing nowhere: one ConfigError, and no run directory (no orphan secret key file)."""
    cfg = load_recipe("recipes/tiny_synthetic.yaml",
                      tiny_overrides(synthetic_data, str(tmp_path / "runs"), **{"server.rounds": 1,
                                                                                 "privacy.reproducible": "false"})
                      + SMALL + [f"server.init_from={tmp_path / 'nowhere' / 'model.safetensors'}"])
    with pytest.raises(ConfigError, match="not found"):
        Simulator(cfg)
    assert not (tmp_path / "runs").exists()


def _scripted_evaluate(monkeypatch, perplexities):
    """Replace the held-out evaluation by a script; remember the weights each call saw."""
    import pflm.evaluation.perplexity as perplexity

    seen = []

    def fake(model, _eval_set, *args, **kwargs):
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"perplexity": perplexities[len(seen) - 1]}

    monkeypatch.setattr(perplexity, "evaluate", fake)
    return seen


def test_pretrain_keeps_the_epoch_with_the_lowest_public_heldout_perplexity(synthetic_data, tmp_path, monkeypatch):
    seen = _scripted_evaluate(monkeypatch, [500.0, 90.0, 70.0, 120.0])  # epoch 2 best, epoch 3 overfits
    out = tmp_path / "pre"
    rc = main(["pretrain", "recipes/tiny_synthetic.yaml", *SMALL, "--data", synthetic_data, "--out", str(out),
               "--epochs", "3", "--threads", "1", "--max-sentences", "300"])
    assert rc == 0 and len(seen) == 4
    info = json.loads((out / "pretrain.json").read_text())
    assert info["kept_epoch"] == 2
    saved = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in seen[2].items())
    assert not all(torch.equal(saved[k], v) for k, v in seen[3].items())  # the last epoch moved the weights


def test_pretraining_that_diverges_writes_nothing(synthetic_data, tmp_path, monkeypatch, capsys):
    _scripted_evaluate(monkeypatch, [500.0, float("nan")])
    out = tmp_path / "pre"
    rc = main(["pretrain", "recipes/tiny_synthetic.yaml", *SMALL, "--data", synthetic_data, "--out", str(out),
               "--epochs", "1", "--threads", "1", "--max-sentences", "300"])
    err = capsys.readouterr().err
    assert rc != 0 and "diverged" in err and "lower --lr" in err
    assert not out.exists()


@pytest.mark.parametrize("args, expected", [(["threads=1"], 1), (["threads=1", "--threads", "3"], 3)])
def test_pretrain_threads_follow_the_recipe_unless_given(synthetic_data, tmp_path, monkeypatch, args, expected):
    """`threads=1` in the overrides used to be ignored (pretrain always ran 2 threads beside other jobs)."""
    _scripted_evaluate(monkeypatch, [500.0, 90.0])
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    rc = main(["pretrain", "recipes/tiny_synthetic.yaml", *SMALL, *args, "--data", synthetic_data,
               "--out", str(tmp_path / "pre"), "--epochs", "1", "--max-sentences", "300"])
    assert rc == 0 and calls[:1] == [expected]


def test_pretrain_refuses_zero_threads(synthetic_data, tmp_path, capsys):
    rc = main(["pretrain", "recipes/tiny_synthetic.yaml", *SMALL, "--data", synthetic_data,
               "--out", str(tmp_path / "pre"), "--threads", "0"])
    assert rc != 0 and "--threads 0 must be >= 1" in capsys.readouterr().err and not (tmp_path / "pre").exists()
