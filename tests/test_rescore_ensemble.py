"""Ensembles of released LMs (`pflm rescore --ensemble`): the scores average, and the printed ε composes every
member's releases — never one member's ε (an attacker holding both models holds both releases)."""

import json
import sys
import types

import pytest
from opacus.accountants import RDPAccountant

from pflm.cli import main
from pflm.epsilon import epsilon_from_history
from pflm.errors import ConfigError
from pflm.evaluation.ensemble import EnsembleScorer, ensemble_privacy_label, run_history
from pflm.evaluation.nbest import write_nbest
from tests.test_rescore_tuning import DEV, TEST_LM_RIGHT, UnigramScorer

SIGMA_600 = 0.858123779296875  # `pflm privacy calibrate --epsilon 2 --sampling-rate 0.005 --rounds 600 --delta 1e-6`
SIGMA_300 = 0.833404541015625  # the same for 300 rounds


class Const:
    def __init__(self, value, vocab=frozenset({"a"}), lower=True):
        self.value, self.vocab, self.lower = value, vocab, lower

    def normalize(self, text):
        return " ".join((text.lower() if self.lower else text).split())

    def score(self, texts):
        return [self.value * len(t.split()) for t in texts]


def write_run(path, sigma, rounds, q=0.005, delta=1e-6, history=True, **extra):
    path.mkdir(parents=True)
    s = {"noise_multiplier": sigma, "sampling_rate": q, "rounds": rounds, "delta": delta, "accountant": "rdp",
         "epsilon": epsilon_from_history([(sigma, q, rounds)], delta) if sigma else None,
         "vocabulary_source": "public", "prior_source": "public",
         "recipe": {"privacy": {"mechanism": "gaussian", "adaptive_clipping": {"enabled": False}}}}
    if history and sigma:
        s["accountant_history"] = [[sigma, q, rounds]]
    s.update(extra)
    (path / "summary.json").write_text(json.dumps(s))
    return path


def test_scores_are_the_mean_and_oov_needs_every_member():
    ens = EnsembleScorer([Const(-1.0, frozenset({"a", "b"})), Const(-3.0, frozenset({"c"}))])
    assert ens.score(["x y", "z"]) == [-4.0, -2.0]
    assert ens.vocab == frozenset({"a", "b", "c"})
    assert EnsembleScorer([Const(-1.0, None), Const(-2.0)]).vocab is None  # a subword member: no OOV words


def test_members_must_normalise_alike_and_be_two():
    with pytest.raises(ConfigError, match="normalises text differently"):
        EnsembleScorer([Const(-1.0), Const(-1.0, lower=False)], names=["a", "b"])
    with pytest.raises(ConfigError, match="at least two"):
        EnsembleScorer([Const(-1.0)])


def test_two_runs_calibrated_for_twice_the_rounds_compose_to_the_target(tmp_path):
    a = write_run(tmp_path / "a", SIGMA_600, 300)
    b = write_run(tmp_path / "b", SIGMA_600, 300)
    # Opacus' RDP accountant over the 600 releases of both runs, done by hand.
    acc = RDPAccountant()
    acc.history = [(SIGMA_600, 0.005, 600)]
    assert acc.get_epsilon(delta=1e-6) == pytest.approx(2.0, abs=1e-3)
    assert ensemble_privacy_label([a, b]) == "DP eps=2.00 delta=1e-06 (2 runs composed)"


def test_attacker_with_both_models_is_charged_both_releases(tmp_path):
    # Two runs that each print ε = 2.00: the pair must not be published as ε = 2.00.
    a = write_run(tmp_path / "a", SIGMA_300, 300)
    b = write_run(tmp_path / "b", SIGMA_300, 300)
    assert json.loads((a / "summary.json").read_text())["epsilon"] == pytest.approx(2.0, abs=1e-3)
    label = ensemble_privacy_label([a, b])
    assert label == "DP eps=2.16 delta=1e-06 (2 runs composed)"
    # A member without noise makes the ensemble non-private, whatever the other member is.
    c = write_run(tmp_path / "c", 0.0, 300)
    assert ensemble_privacy_label([a, c]).startswith("NON-PRIVATE")


def test_public_pretrained_members_add_no_release_but_never_hide_a_private_one(tmp_path):
    a = write_run(tmp_path / "a", SIGMA_600, 300)
    b = write_run(tmp_path / "b", SIGMA_600, 300)
    pub = tmp_path / "pub"
    pub.mkdir()
    (pub / "pretrain.json").write_text(json.dumps({"data": "public"}))
    assert ensemble_privacy_label([a, b, pub]) == "DP eps=2.00 delta=1e-06 (2 runs composed + 1 public)"
    assert ensemble_privacy_label([pub, pub]) == "PUBLIC data only (no user data, eps=0)"
    # a pretrain.json that does not say "public" is not trusted as public
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "pretrain.json").write_text(json.dumps({"data": "chitchat"}))
    with pytest.raises(ConfigError, match="has no summary.json"):
        ensemble_privacy_label([a, fake])


def test_history_that_understates_the_printed_epsilon_is_refused(tmp_path):
    # e.g. a resumed run whose redone rounds were charged twice: (σ, q, rounds) alone would understate ε.
    eps = epsilon_from_history([(SIGMA_300, 0.005, 350)], 1e-6)
    a = write_run(tmp_path / "a", SIGMA_300, 300, history=False, epsilon=eps)
    with pytest.raises(ConfigError, match="do not reproduce its printed"):
        run_history(a)
    # with the accountant history the summary carries, the run composes exactly
    b = write_run(tmp_path / "b", SIGMA_300, 300, epsilon=eps, accountant_history=[[SIGMA_300, 0.005, 350]])
    assert run_history(b)[0] == [(SIGMA_300, 0.005, 350)]


def test_dp_vocabulary_and_other_mechanisms_are_not_composed_silently(tmp_path):
    a = write_run(tmp_path / "a", SIGMA_300, 300, vocabulary_source="dp")
    with pytest.raises(ConfigError, match="compose its privacy by hand"):
        run_history(a)
    b = write_run(tmp_path / "b", SIGMA_300, 300, recipe={"privacy": {"mechanism": "dpftrl"}})
    with pytest.raises(ConfigError, match="compose its privacy by hand"):
        run_history(b)


def test_rescore_cli_ensemble_is_one_system_with_composed_privacy(tmp_path, monkeypatch, capsys):
    mod = types.ModuleType("pflm.evaluation.lm_scorer")
    mod.load_scorer = lambda run_dir: UnigramScorer()
    monkeypatch.setitem(sys.modules, "pflm.evaluation.lm_scorer", mod)
    a = write_run(tmp_path / "a", SIGMA_600, 300)
    b = write_run(tmp_path / "b", SIGMA_600, 300)
    dev = write_nbest(tmp_path / "dev.jsonl", DEV)
    test = write_nbest(tmp_path / "test.jsonl", TEST_LM_RIGHT)
    out = tmp_path / "out"
    rc = main(["rescore", "--checkpoint", str(a), "--ensemble", str(b), "--dev", str(dev), "--test", str(test),
               "--out", str(out), "--alpha-grid", "0,0.01,0.1,1", "--beta-grid=0", "--bootstrap", "50"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "LM a+b" in printed and "DP eps=2.00 delta=1e-06 (2 runs composed)" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ensemble"] == [str(b)] and summary["privacy"] == "DP eps=2.00 delta=1e-06 (2 runs composed)"
    assert summary["relative_reduction"] > 0


def test_ensemble_members_calibrate_for_the_pair_and_cap_each_member(synthetic_data, tmp_path):
    from pflm.config import load_recipe
    from pflm.privacy.accountant import PrivacyBudget
    from pflm.simulation.simulator import Simulator
    from tests.conftest import tiny_overrides

    over = {"privacy.target_epsilon": 2.0, "privacy.population": 1_000_000, "privacy.noise_cohort": 5000,
            "privacy.delta": 1e-6, "server.rounds": 3, "privacy.ensemble_members": 2}
    sim = Simulator(load_recipe("recipes/tiny_synthetic.yaml", tiny_overrides(synthetic_data, str(tmp_path), **over)))
    mech = sim.server.privacy
    single = PrivacyBudget(population=1_000_000, cohort=5000, rounds=6, delta=1e-6, epsilon=2.0)
    assert mech.noise_multiplier == single.noise_multiplier  # σ of one 6-round run = two 3-round members
    summary = sim.run(progress=False)
    assert summary["ensemble_members"] == 2
    assert summary["ensemble_epsilon"] == pytest.approx(single.epsilon, rel=1e-9) and summary["ensemble_epsilon"] <= 2.0
    assert summary["epsilon"] < summary["ensemble_epsilon"]
    assert "one of 2 runs released together" in summary["epsilon_refers_to"]
    # A member may not spend the pair's budget: one release beyond its planned rounds is refused although its
    # own ε would still be below the target.
    assert mech.accountant.epsilon_if_step(mech.noise_multiplier, mech.q, 1e-6) < 2.0
    assert mech.stop_reason(3) is not None
    # the two members' summaries compose (pflm rescore --ensemble) to the same ε
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    assert ensemble_privacy_label([tmp_path / "a", tmp_path / "b"]) == f"DP eps={single.epsilon:.2f} delta=1e-06 (2 runs composed)"


def test_ensemble_members_refuses_mechanisms_it_cannot_split():
    from pflm.config import PrivacyConfig

    with pytest.raises(ConfigError, match="ensemble_members"):
        PrivacyConfig(target_epsilon=2.0, noise_multiplier=None, ensemble_members=0)
    with pytest.raises(ConfigError, match="mechanism=gaussian"):
        PrivacyConfig(target_epsilon=2.0, noise_multiplier=None, ensemble_members=2, mechanism="dpftrl")


def test_rescore_cli_compares_against_another_ensemble(tmp_path, monkeypatch, capsys):
    mod = types.ModuleType("pflm.evaluation.lm_scorer")
    mod.load_scorer = lambda run_dir: UnigramScorer()
    monkeypatch.setitem(sys.modules, "pflm.evaluation.lm_scorer", mod)
    a, b = write_run(tmp_path / "a", SIGMA_600, 300), write_run(tmp_path / "b", SIGMA_600, 300)
    c, d = write_run(tmp_path / "c", SIGMA_300, 300), write_run(tmp_path / "d", SIGMA_300, 300)
    dev = write_nbest(tmp_path / "dev.jsonl", DEV)
    test = write_nbest(tmp_path / "test.jsonl", TEST_LM_RIGHT)
    args = ["rescore", "--checkpoint", str(a), "--ensemble", str(b), "--dev", str(dev), "--test", str(test),
            "--alpha-grid", "0,0.01,0.1,1", "--beta-grid=0", "--bootstrap", "50"]
    assert main(args + ["--out", str(tmp_path / "o1"), "--compare", f"{c}+{d}"]) == 0
    printed = capsys.readouterr().out
    # the second pair is one system too, charged both of its members' releases (2 x eps 2 -> 2.16)
    assert "LM c+d" in printed and "DP eps=2.16 delta=1e-06 (2 runs composed)" in printed
    names = [s["name"] for s in json.loads((tmp_path / "o1" / "summary.json").read_text())["comparison"]["systems"]]
    assert names == ["first pass", "LM a+b", "LM c+d"]
    # a directory whose name holds '+' is a run, not an ensemble; an empty member is a one-line error
    plus = write_run(tmp_path / "x+y", SIGMA_300, 300)
    assert main(args + ["--out", str(tmp_path / "o2"), "--compare", str(plus)]) == 0
    assert "LM x+y" in capsys.readouterr().out
    assert main(args + ["--out", str(tmp_path / "o3"), "--compare", f"{c}+"]) == 2
    assert "a member is empty" in capsys.readouterr().err
