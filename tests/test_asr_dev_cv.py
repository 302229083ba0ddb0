"""scripts/asr_dev_cv.py: subsets keep utterances aligned, and the held-out gain is the tuned rescoring's gain."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from pflm.evaluation.rescore import ScoredNBest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("asr_dev_cv", ROOT / "scripts" / "asr_dev_cv.py")
cv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cv)


def _scored(n: int, lm_helps: bool) -> ScoredNBest:
    """n utterances of 2 hypotheses: first pass (rank 0) has 1 error, rank 1 none; the LM prefers rank 1 iff
    `lm_helps` (first-pass scores differ by 1e-3, as in pocketsphinx N-best lists)."""
    good = 1.0 if lm_helps else -1.0
    return ScoredNBest(
        utt_ids=[f"u{i}" for i in range(n)], refs=["a b"] * n, texts=[["a c", "a b"] for _ in range(n)],
        base=np.tile([0.0, -1e-3], (n, 1)), first_pass=np.tile([0.0, -1e-3], (n, 1)),
        lm=np.tile([-5.0, -5.0 + good], (n, 1)), words=np.full((n, 2), 2.0),
        errors=np.tile([1, 0], (n, 1)).astype(np.int64), ref_words=np.full(n, 2, dtype=np.int64))


def test_subset_keeps_rows_aligned():
    s = _scored(5, True)
    s.errors[3] = [2, 1]
    sub = cv.subset(s, np.array([3, 0]))
    assert sub.utt_ids == ["u3", "u0"] and sub.errors.tolist() == [[2, 1], [1, 0]]
    assert sub.base.shape == (2, 2) and sub.ref_words.tolist() == [2, 2]


@pytest.mark.parametrize("lm_helps, expected", [(True, 1.0), (False, 0.0)])
def test_heldout_gain_is_the_relative_wer_reduction_of_the_tuned_weights(lm_helps, expected):
    s = _scored(20, lm_helps)
    gain = cv.heldout_gain(s, np.arange(10), np.arange(10, 20), cv.RescoreConfig())
    assert gain == pytest.approx(expected)  # helpful LM: every error fixed; useless LM: alpha = 0, no change
