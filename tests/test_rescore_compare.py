"""`pflm rescore` system comparison: each LM tuned on dev only, paired statistics, NON-PRIVATE labels, PNG."""

import json

import numpy as np
import pytest

from pflm.cli import main
from pflm.evaluation.compare import LMSource, compare
from pflm.evaluation.nbest import write_nbest
from pflm.evaluation.rescore import RescoreConfig
from tests.test_rescore_cli import fake_lm_scorer  # noqa: F401  (fixture)
from tests.test_rescore_tuning import DEV, SMALL, TEST_LM_RIGHT, TEST_LM_WRONG, UnigramScorer


class ReversedScorer(UnigramScorer):
    """Prefers exactly what UnigramScorer dislikes: tuning on dev must then switch it off (alpha = 0)."""

    def score(self, texts):
        return [-s for s in super().score(texts)]


def test_each_system_is_tuned_on_dev_and_tested_with_paired_statistics():
    tests = {"a": TEST_LM_RIGHT + TEST_LM_WRONG[2:], "b": TEST_LM_WRONG}
    cmp = compare(DEV, tests, [LMSource("good", "DP", UnigramScorer()), LMSource("bad", "x", ReversedScorer())],
                  lambda w: w == "cab", SMALL, pairs=[("good", "bad")], resamples=200)
    first, good, bad = cmp.systems
    assert (good.alpha, bad.alpha) == (0.01, 0.0)  # the reversed LM cannot help on dev, so it is switched off
    assert first.sets["a"].wer == pytest.approx(2 / 5) and good.sets["a"].wer == pytest.approx(1 / 5)
    assert good.sets["a"].vs_first.delta == pytest.approx(-1 / 5)
    assert bad.sets["a"].vs_first is None  # identical to the first pass: nothing to test
    # on set b the good LM picks the wrong hypotheses (the references contain "cab"/"sad"): WER rises
    assert good.sets["b"].wer > first.sets["b"].wer
    # tail: "cab" is the rare word of set b's first reference; the first pass gets it, the LM does not
    assert first.sets["b"].tail.rare_recall == 1.0 and good.sets["b"].tail.rare_recall == 0.0
    pair = [p for p in cmp.pairwise if p["test_set"] == "a"][0]
    assert pair["bootstrap"].delta == pytest.approx(1 / 5)  # bad (= first pass) minus good
    assert cmp.oracle_wer["a"] == pytest.approx(1 / 5)


def test_interpolation_weight_is_tuned_on_dev():
    cmp = compare(DEV, {"t": TEST_LM_RIGHT}, [LMSource("good", "DP", UnigramScorer()),
                                             LMSource("bad", "NON-PRIVATE", ReversedScorer())],
                  lambda w: False, SMALL, interpolate=("good", "bad"), resamples=100)
    mix = cmp.systems[-1]
    assert mix.lam is not None and mix.lam > 0.5 and "NON-PRIVATE" in mix.privacy
    assert mix.dev_wer == 0.0


def test_rescore_cli_prints_the_comparison_and_plots(tmp_path, capsys, fake_lm_scorer, synthetic_data):  # noqa: F811
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dev = write_nbest(tmp_path / "dev.jsonl", DEV)
    test = write_nbest(tmp_path / "test.jsonl", TEST_LM_RIGHT + TEST_LM_WRONG[2:])
    other = write_nbest(tmp_path / "other.jsonl", TEST_LM_WRONG)
    out = tmp_path / "out"
    rc = main(["rescore", "--checkpoint", str(run_dir), "--dev", str(dev), "--test", str(test), "--out", str(out),
               "--alpha-grid", "0,0.001,0.01,0.1,1", "--beta-grid=-0.1:0.1:0.1", "--extra-test", f"voice2={other}",
               "--ngram-data", synthetic_data, "--interpolate", "--bootstrap", "200"])
    assert rc == 0
    text = capsys.readouterr().out
    lines = text.strip().splitlines()
    assert lines[-3:] == ["first_pass_wer: 0.4000", "rescored_wer: 0.2000", "oracle_wer: 0.2000"]
    assert "NON-PRIVATE" in text and "test set 'voice2'" in text and "Bisani & Ney" in text
    summary = json.loads((out / "summary.json").read_text())
    systems = summary["comparison"]["systems"]
    assert [s["name"] for s in systems] == ["first pass", "LM run", "3-gram KN", "LM run + 3-gram KN (log-linear)"]
    assert all("NON-PRIVATE" in s["privacy"] for s in systems[2:])
    assert set(systems[1]["test"]) == {"test", "voice2"}
    assert np.isclose(systems[1]["test"]["test"]["wer"], 0.2)
    assert (out / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_extra_test_spec_exits_2(tmp_path, fake_lm_scorer):  # noqa: F811
    dev = write_nbest(tmp_path / "dev.jsonl", DEV)
    assert main(["rescore", "--checkpoint", str(tmp_path), "--dev", str(dev), "--test", str(dev),
                 "--extra-test", "no-equals-sign"]) == 2
    assert main(["rescore", "--checkpoint", str(tmp_path), "--dev", str(dev), "--test", str(dev),
                 "--interpolate"]) == 2
    assert main(["rescore", "--checkpoint", str(tmp_path), "--dev", str(dev), "--test", str(dev),
                 "--smooth", "-1"]) == 2


def test_rare_word_coverage_bounds_recall():
    from pflm.evaluation.tail_words import nbest_rare_coverage

    rare = {"zyx", "qua"}.__contains__
    refs = ["a zyx b qua", "qua qua", "c"]
    nbest = [["a zyx b", "a b c"], ["qua x"], []]
    # zyx is in a hypothesis of its own utterance, the first qua is not; both qua of utterance 2 are coverable
    assert nbest_rare_coverage(refs, nbest, rare) == (4, 3)
    with pytest.raises(Exception, match="one N-best list per reference"):
        nbest_rare_coverage(refs, nbest[:2], rare)


def test_test_tuned_ceiling_is_never_worse_than_the_dev_tuned_result():
    tests = {"a": TEST_LM_RIGHT + TEST_LM_WRONG[2:], "b": TEST_LM_WRONG}
    cmp = compare(DEV, tests, [LMSource("good", "DP", UnigramScorer()), LMSource("bad", "x", ReversedScorer())],
                  lambda w: w == "cab", SMALL, interpolate=("good", "bad"), resamples=100)
    for s in cmp.systems[1:]:
        for k in tests:
            assert s.sets[k].test_tuned_wer is not None and s.sets[k].test_tuned_wer <= s.sets[k].wer + 1e-12
    # set b: the dev-tuned good LM is worse than the first pass, but alpha = 0 on the test set recovers it
    first_b = cmp.systems[0].sets["b"].wer
    assert cmp.systems[1].sets["b"].wer > first_b and cmp.systems[1].sets["b"].test_tuned_wer <= first_b
    assert cmp.rare_coverage["b"][0] >= 1


def test_headroom_shows_what_no_rescoring_can_gain_on_rare_word_utterances():
    from pflm.evaluation.compare_report import format_lines, to_json

    # set: "the cat ran" (first pass "the cab ran", the LM fixes it) and "the dog" (only hypothesis "the dig");
    # "dog" is the rare word: its utterance has one hypothesis, so no LM can lower its WER
    cmp = compare(DEV, {"a": TEST_LM_RIGHT + TEST_LM_WRONG[2:]}, [LMSource("good", "DP", UnigramScorer())],
                  lambda w: w == "dog", SMALL, resamples=100)
    assert cmp.oracle_wer["a"] == pytest.approx(1 / 5)
    assert cmp.oracle_tail["a"].rare_utt_wer == pytest.approx(1 / 2) == cmp.systems[0].sets["a"].tail.rare_utt_wer
    good = to_json(cmp, 3.0, 100)["systems"][1]["test"]["a"]
    assert good["reachable_share"] == pytest.approx(1.0)  # took all the overall headroom: 2/5 -> 1/5
    assert good["rare_utt_reachable_share"] is None  # first pass == oracle there: nothing to take
    assert good["rare_utt_relative_reduction"] == 0.0
    text = "\n".join(format_lines(cmp, 3.0))
    assert "the first pass already matches 0" in text
    assert "no rescoring can lower WER by more than 50.0% relative overall and 0.0% on rare-word utterances" in text
    assert "good 100.0% / -%" in text
