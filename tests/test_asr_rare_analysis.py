"""scripts/asr_rare_analysis.py: rare reference words are counted by where they are, against hand-made lists."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
_spec = importlib.util.spec_from_file_location("asr_rare_analysis", ROOT / "scripts" / "asr_rare_analysis.py")
rare = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rare)

from pflm.evaluation.nbest import Hypothesis, NBestUtterance  # noqa: E402


def utt(ref, *hyps):
    return NBestUtterance("u", ref, tuple(Hypothesis(t, s) for t, s in hyps))


def test_breakdown_counts_lexicon_hypotheses_and_first_pass():
    # "trombone" (Zipf ~2.9) is in the lexicon and in the lower-scored hypothesis only; "weekedn" (a typo, not a
    # wordfreq word) is in neither; "the"/"a"/"played" are common and not counted
    utts = [utt("i played the trombone", ("i played the trombone", -2.0), ("i played a trampoline", -1.0)),
            utt("a weekedn", ("a weekend", -1.0))]
    c = rare.rare_breakdown(utts, lexicon={"i", "played", "the", "a", "trombone", "weekend"}, vocab={"the"},
                            zipf=3.0)
    assert c["rare tokens"] == 2
    assert c["in recognizer lexicon"] == 1 and c["not listed by wordfreq (typos, elongations, digits)"] == 1
    assert c["in any N-best hypothesis"] == 1
    assert c["in the first-pass hypothesis"] == 0  # the best-scored hypothesis (-1.0) is the trampoline one
    assert c["in LM vocabulary"] == 0 and c["contain a digit"] == 0


def test_rare_word_bounds_on_a_hand_made_list():
    from pflm.evaluation.rescore import score_nbest

    class Flat:
        def normalize(self, text):
            return text

        def score(self, texts):
            return [0.0] * len(texts)

    # utterance 1: the choice (first pass) misses "trombone", which the second hypothesis has, and has one more
    # error ("a" for "the"); utterance 2 has no rare word and one error
    utts = [utt("i played the trombone", ("i played a trampoline", -1.0), ("i played the trombone", -2.0)),
            utt("the dog ran", ("the dog rang", -1.0))]
    s = score_nbest(utts, Flat())
    b = rare.rare_word_bound(s, np.zeros(2, dtype=np.int64), lambda w: w == "trombone")
    assert b["overall"] == 0.0 and b["rare_utts"] == 0.0 and b["missed"] == 1 and b["switched"] == 1
    assert b["per_token_bound"] == pytest.approx(1 / 2)  # 2 errors, one fixed
    assert b["generous_bound"] == pytest.approx(1.0)  # switched to its oracle: no errors left
