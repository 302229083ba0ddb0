"""WER against hand-computed cases: substitution, insertion, deletion, empty sides, corpus-level aggregation."""

import jiwer
import pytest

from pflm.errors import DataError
from pflm.evaluation.wer import corpus_wer, errors_batch, utterance_errors, wer_from_counts


@pytest.mark.parametrize(
    "ref,hyp,expected",
    [
        ("a b c", "a b c", (0, 3)),
        ("a b c", "a x c", (1, 3)),  # one substitution
        ("a b c", "a b c d", (1, 3)),  # one insertion
        ("a b c", "a c", (1, 3)),  # one deletion
        ("a b c", "", (3, 3)),  # empty hypothesis: all deleted
        ("", "a b", (2, 0)),  # empty reference: all inserted
        ("", "", (0, 0)),
        ("the cat sat on the mat", "the cat sat on mat the", (2, 6)),  # deletion + insertion
        ("i like it", "i i like it it", (2, 3)),  # two insertions
        ("hello how are you", "hello keller you", (2, 4)),  # sub + del
        ("  spaced   words ", "spaced words", (0, 2)),  # whitespace is not a word
    ],
)
def test_utterance_errors_hand_computed(ref, hyp, expected):
    assert utterance_errors(ref, hyp) == expected


def test_corpus_wer_is_total_errors_over_total_words_not_mean():
    refs = ["a b c d", "e f"]
    hyps = ["a b c d", "x"]  # 0 errors / 4 words, then sub + del = 2 errors / 2 words
    assert corpus_wer(refs, hyps) == pytest.approx(2 / 6)
    # the mean of per-utterance WERs would be 0.5: make sure we do not compute that
    assert corpus_wer(refs, hyps) != pytest.approx(0.5)


def test_corpus_wer_matches_jiwer_on_nonempty_refs():
    refs = ["the quick brown fox", "jumps over", "the lazy dog today"]
    hyps = ["the quick brown box", "jumps over the", "lazy dog to day"]
    assert corpus_wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))
    assert errors_batch(refs, hyps) == [(1, 4), (1, 2), (3, 4)]


def test_empty_refs_in_a_corpus_count_insertions():
    assert corpus_wer(["a b", ""], ["a b", "x y z"]) == pytest.approx(3 / 2)


def test_corpus_without_reference_words():
    assert corpus_wer(["", ""], ["", ""]) == 0.0
    with pytest.raises(DataError, match="no words"):
        corpus_wer([""], ["oops"])
    with pytest.raises(DataError, match="no words"):
        wer_from_counts(1, 0)


def test_length_mismatch_is_an_error():
    with pytest.raises(DataError, match="one hypothesis per reference"):
        corpus_wer(["a"], ["a", "b"])


def test_empty_corpus_batch():
    assert errors_batch([], []) == []
