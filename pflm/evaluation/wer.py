"""Word error rate via jiwer: per-utterance error counts and corpus-level WER (total errors / total reference words)."""

from __future__ import annotations

from typing import Sequence

import jiwer

from pflm.errors import DataError


def _check_lengths(refs: Sequence[str], hyps: Sequence[str]) -> None:
    if len(refs) != len(hyps):
        raise DataError(f"WER needs one hypothesis per reference, got {len(refs)} refs and {len(hyps)} hyps")


def errors_batch(refs: Sequence[str], hyps: Sequence[str]) -> list[tuple[int, int]]:
    """(errors, reference words) for each pair, aligned by jiwer in one batched call.

    Errors = substitutions + deletions + insertions of the minimum-edit alignment over whitespace-separated words.
    An empty reference has 0 words and every hypothesis word counts as an insertion; an empty hypothesis deletes
    every reference word.
    """
    _check_lengths(refs, hyps)
    if not refs:
        return []
    out = jiwer.process_words(list(refs), list(hyps))
    result = []
    for ref_words, chunks in zip(out.references, out.alignments):
        errors = 0
        for c in chunks:
            if c.type in ("substitute", "delete"):
                errors += c.ref_end_idx - c.ref_start_idx
            elif c.type == "insert":
                errors += c.hyp_end_idx - c.hyp_start_idx
        result.append((errors, len(ref_words)))
    return result


def utterance_errors(ref: str, hyp: str) -> tuple[int, int]:
    """(word errors, reference word count) for one utterance."""
    return errors_batch([ref], [hyp])[0]


def wer_from_counts(errors: int, ref_words: int) -> float:
    """Corpus WER from totals; a corpus with no reference words has WER 0 only if nothing was inserted."""
    if ref_words == 0:
        if errors == 0:
            return 0.0
        raise DataError(
            f"WER is undefined: the references contain no words but the hypotheses have {errors}; "
            "check that the 'ref' fields are filled in"
        )
    return errors / ref_words


def corpus_wer(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Corpus-level WER = total word errors / total reference words (not the mean of per-utterance WERs)."""
    counts = errors_batch(refs, hyps)
    return wer_from_counts(sum(e for e, _ in counts), sum(n for _, n in counts))
