"""Rescoring picks what a deterministic LM prefers, and alpha/beta are tuned on the dev set only."""

import math

import numpy as np
import pytest

from pflm.errors import ConfigError, DataError
from pflm.evaluation.nbest import Hypothesis, NBestUtterance, write_nbest
from pflm.evaluation.rescore import RescoreConfig, evaluate, rescore_files, score_nbest, select, tune

LOGP = {"the": -1.0, "cat": -2.0, "sat": -2.0, "dog": -2.0, "ran": -2.0, "cab": -8.0, "sad": -8.0, "</s>": -1.0}


class UnigramScorer:
    """Deterministic SentenceScorer: sum of unigram log-probs plus </s>; records every batch it is asked for."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def normalize(self, text: str) -> str:
        return " ".join(text.lower().split())

    def score(self, texts: list[str]) -> list[float]:
        self.calls.append(list(texts))
        return [sum(LOGP.get(w, -10.0) for w in t.split()) + LOGP["</s>"] for t in texts]


def utt(uid, ref, *hyps):
    return NBestUtterance(uid, ref, tuple(Hypothesis(t, s) for t, s in hyps))


# The first pass prefers a wrong hypothesis by 0.05; the LM prefers the right one by 6 nats.
DEV = [
    utt("d1", "the cat sat", ("the cab sat", -1.00), ("the cat sat", -1.05)),
    utt("d2", "the dog ran", ("the dog ran", -2.00), ("the dog cab", -2.20)),
    utt("d3", "the cat", ("the sad cat", -0.50), ("the cat", -0.52)),
]
# On this "test" set the LM is wrong: tuning on it would choose alpha = 0.
TEST_LM_WRONG = [
    utt("t1", "the cab sat", ("the cab sat", -1.00), ("the cat sat", -1.05)),
    utt("t2", "the sad dog", ("the sad dog", -1.00), ("the dog", -1.01)),
    utt("t3", "the dog", ("the dig", -1.00)),
]
TEST_LM_RIGHT = [utt("t1", "the cat ran", ("the cab ran", -1.00), ("the cat ran", -1.02))]
SMALL = RescoreConfig(alpha_grid=(0.0, 0.001, 0.01, 0.1, 1.0), beta_grid=(-0.1, 0.0, 0.1))


def test_rescoring_picks_the_lm_preferred_hypothesis():
    scorer = UnigramScorer()
    dev = score_nbest(DEV, scorer)
    tuned = tune(dev, SMALL)
    assert tuned.alpha == 0.01  # smallest alpha that flips d1 and d3 (needs alpha > 0.05 / 6)
    assert tuned.beta == 0.0  # ties are broken toward the smaller |beta|
    assert tuned.dev_first_pass_wer == pytest.approx(2 / 8)  # d1: cab/cat, d3: extra "sad"
    assert tuned.dev_rescored_wer == 0.0
    assert tuned.dev_oracle_wer == 0.0
    chosen = select(dev, tuned.alpha, tuned.beta)
    assert [dev.texts[i][j] for i, j in enumerate(chosen)] == ["the cat sat", "the dog ran", "the cat"]


def test_each_distinct_hypothesis_is_scored_once_in_batches():
    scorer = UnigramScorer()
    dup = DEV + [utt("d4", "the cat sat", ("The  cat sat", -1.0), ("the cab sat", -1.1))]
    score_nbest(dup, scorer, batch_size=2)
    flat = [t for call in scorer.calls for t in call]
    assert len(flat) == len(set(flat)) == 6  # "The  cat sat" normalizes to an already-seen text
    assert all(len(c) <= 2 for c in scorer.calls)


def test_tuning_uses_dev_only(tmp_path):
    dev_path = write_nbest(tmp_path / "dev.jsonl", DEV)
    wrong = write_nbest(tmp_path / "test_wrong.jsonl", TEST_LM_WRONG)
    right = write_nbest(tmp_path / "test_right.jsonl", TEST_LM_RIGHT)
    # If the test set leaked into tuning it would change the choice: on its own it selects alpha = 0.
    assert tune(score_nbest(TEST_LM_WRONG, UnigramScorer()), SMALL).alpha == 0.0
    dev_only = tune(score_nbest(DEV, UnigramScorer()), SMALL)
    r1 = rescore_files(dev_path, wrong, UnigramScorer(), SMALL)
    r2 = rescore_files(dev_path, right, UnigramScorer(), SMALL)
    for r in (r1, r2):
        assert (r.tuned.alpha, r.tuned.beta) == (dev_only.alpha, dev_only.beta) == (0.01, 0.0)
        assert r.tuned.grid == dev_only.grid
    # dev-tuned weights are then applied to test as they are, even where they hurt
    assert r1.test.first_pass_wer == pytest.approx(1 / 8) and r1.test.rescored_wer == pytest.approx(3 / 8)
    assert r1.test.relative_reduction == pytest.approx(-2.0)
    assert r2.test.rescored_wer == 0.0 and r2.test.relative_reduction == 1.0


def test_test_file_is_read_after_tuning(tmp_path):
    """The dev file is scored (tuned) before the test file is opened: a broken test file fails after tuning."""
    dev_path = write_nbest(tmp_path / "dev.jsonl", DEV)
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"utt_id": "x"}\n')
    scorer = UnigramScorer()
    with pytest.raises(DataError, match="line 1"):
        rescore_files(dev_path, bad, scorer, SMALL)
    assert {t for c in scorer.calls for t in c} == {
        scorer.normalize(h.text) for u in DEV for h in u.nbest
    }


def test_evaluate_rows_and_oracle():
    scored = score_nbest(DEV + TEST_LM_WRONG, UnigramScorer())
    res = evaluate(scored, 0.0, 0.0)
    assert res.first_pass_wer == res.rescored_wer == pytest.approx(3 / 16)
    assert res.oracle_wer == pytest.approx(1 / 16)  # only "the dig" (a single hypothesis) stays wrong
    row = res.rows[0]
    assert row["utt_id"] == "d1" and row["first_pass"] == "the cab sat" and row["first_pass_errors"] == 1
    assert row["oracle"] == "the cat sat" and row["oracle_errors"] == 0 and row["ref_words"] == 3


def test_word_bonus_can_favor_longer_hypotheses():
    data = [utt("a", "the cat sat", ("the cat", -1.0), ("the cat sat", -1.3))]
    tuned = tune(score_nbest(data, UnigramScorer()), RescoreConfig(alpha_grid=(0.0,), beta_grid=(0.0, 0.2, 0.5)))
    assert (tuned.alpha, tuned.beta) == (0.0, 0.5)
    assert tuned.dev_rescored_wer == 0.0


def test_am_score_replaces_first_pass_score_as_base():
    data = [
        NBestUtterance("a", "the cat", (Hypothesis("the cab", -1.0, am_score=-5.0), Hypothesis("the cat", -1.1, am_score=-4.0)))
    ]
    scored = score_nbest(data, UnigramScorer())
    assert scored.texts[0][0] == "the cab"  # first pass still ranks by score
    assert np.allclose(scored.base[0], [-5.0, -4.0])
    assert evaluate(scored, 0.0, 0.0).rescored_wer == 0.0


def test_default_grid_is_log_spaced_and_relative_beta():
    cfg = RescoreConfig()
    pairs = cfg.pairs()
    assert (0.0, 0.0) in pairs and sum(1 for a, _ in pairs if a == 0.0) == 1
    alphas = sorted({a for a, _ in pairs if a > 0})
    assert alphas[0] == pytest.approx(1e-4) and alphas[-1] == pytest.approx(10.0)
    assert all(abs(b) <= 5 * a + 1e-12 for a, b in pairs)


def test_bad_scorer_output_and_config():
    class Broken(UnigramScorer):
        def score(self, texts):
            return [-math.inf for _ in texts]

    with pytest.raises(DataError, match="non-finite"):
        score_nbest(DEV, Broken())
    with pytest.raises(ConfigError):
        RescoreConfig(alpha_grid=())
    with pytest.raises(ConfigError):
        RescoreConfig(alpha_grid=(-1.0,))
    with pytest.raises(ConfigError):
        RescoreConfig(beta_grid=(float("nan"),))


def test_smoothed_tuning_prefers_a_flat_minimum_over_a_lucky_grid_point():
    from pflm.evaluation.rescore import _smoothed_choice

    # dev errors per (alpha, beta): alpha 0.004 is a lone dip, 0.001..0.002 a flat valley
    errs = {0.0: 50, 0.0005: 45, 0.001: 41, 0.0015: 40, 0.002: 41, 0.003: 47, 0.004: 39, 0.005: 48}
    results = [(e, a, 0.0) for a, e in errs.items()] + [(e + 1, a, 0.1) for a, e in errs.items()]
    assert min(results, key=lambda r: (r[0], abs(r[1]), abs(r[2])))[1] == 0.004  # the plain minimum
    assert _smoothed_choice(results, 1) == (40, 0.0015, 0.0)
    assert _smoothed_choice(results, 0)[1] == 0.004  # k = 0 is the plain minimum
    assert _smoothed_choice([(10, 0.0, 0.0), (12, 0.001, 0.0), (11, 0.002, 0.0)], 1)[1] == 0.0  # LM switched off
    with pytest.raises(ConfigError, match="smooth"):
        RescoreConfig(smooth=-1)
    dev = score_nbest(DEV, UnigramScorer())
    assert tune(dev, RescoreConfig(alpha_grid=SMALL.alpha_grid, beta_grid=SMALL.beta_grid, smooth=1)).alpha > 0
