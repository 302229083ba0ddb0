"""Tail-word metrics for rescoring: WER on utterances with rare words, rare-word recall, OOV rates of N-best lists.

"Rare" is decided by a PUBLIC frequency list, never by the training users: a word is rare when its wordfreq Zipf
frequency (log10 of occurrences per billion words, English 'large' list) is below `threshold`. The default 3.0 is
one occurrence per million words of public English text.

* rare-utterance WER: corpus WER over the utterances whose reference contains at least one rare word;
* rare-word recall: the share of rare reference word tokens that the hypothesis aligns as a *match* (the minimum
  edit alignment of jiwer, the one WER uses), i.e. rare words the recognizer got exactly right.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Sequence

import jiwer

from pflm.errors import DataError

DEFAULT_RARE_ZIPF = 3.0


@lru_cache(maxsize=1)
def _zipf() -> Callable[[str], float]:
    import wordfreq

    table = wordfreq.get_frequency_dict("en", wordlist="large")
    import math

    return lambda w: math.log10(table[w] * 1e9) if w in table else 0.0


def zipf_frequency(word: str) -> float:
    """wordfreq's Zipf frequency of an (already normalised) word; 0 for words wordfreq does not list."""
    return _zipf()(word)


def rare_predicate(threshold: float = DEFAULT_RARE_ZIPF) -> Callable[[str], bool]:
    return lambda w: zipf_frequency(w) < threshold


@dataclass(frozen=True)
class TailStats:
    """Word errors on the rare-word utterances and rare-word hits of one system's chosen hypotheses."""

    rare_utterances: int
    rare_utt_errors: int
    rare_utt_ref_words: int
    rare_tokens: int  # rare words in the references
    rare_hits: int  # of those, matched by the hypothesis

    @property
    def rare_utt_wer(self) -> float:
        return self.rare_utt_errors / self.rare_utt_ref_words if self.rare_utt_ref_words else 0.0

    @property
    def rare_recall(self) -> float:
        return self.rare_hits / self.rare_tokens if self.rare_tokens else 0.0


def rare_mask(refs: Sequence[str], is_rare: Callable[[str], bool]) -> list[bool]:
    """Which utterances' references contain a rare word."""
    return [any(is_rare(w) for w in r.split()) for r in refs]


def tail_stats(refs: Sequence[str], hyps: Sequence[str], errors: Sequence[int],
               is_rare: Callable[[str], bool]) -> TailStats:
    """Tail metrics of one system: `errors[i]` are its word errors on utterance i (as in `wer.errors_batch`)."""
    if not (len(refs) == len(hyps) == len(errors)):
        raise DataError(f"tail metrics need equal lengths, got {len(refs)} refs, {len(hyps)} hyps, {len(errors)} errors")
    mask = rare_mask(refs, is_rare)
    rare_errors = sum(int(e) for e, m in zip(errors, mask) if m)
    rare_words = sum(len(r.split()) for r, m in zip(refs, mask) if m)
    tokens = hits = 0
    idx = [i for i, m in enumerate(mask) if m]
    if idx:
        out = jiwer.process_words([refs[i] for i in idx], [hyps[i] for i in idx])
        for ref_words, chunks in zip(out.references, out.alignments):
            rare_pos = {j for j, w in enumerate(ref_words) if is_rare(w)}
            tokens += len(rare_pos)
            for c in chunks:
                if c.type == "equal":
                    hits += sum(1 for j in range(c.ref_start_idx, c.ref_end_idx) if j in rare_pos)
    return TailStats(sum(mask), rare_errors, rare_words, tokens, hits)


def nbest_rare_coverage(refs: Sequence[str], nbest_texts: Sequence[Sequence[str]],
                        is_rare: Callable[[str], bool]) -> tuple[int, int]:
    """(rare reference words, those that occur in at least one hypothesis of their utterance's N-best list).

    The second count bounds the rare-word recall of any N-best rescoring: a word no hypothesis contains cannot be
    recovered by choosing another hypothesis.
    """
    if len(refs) != len(nbest_texts):
        raise DataError(f"coverage needs one N-best list per reference, got {len(nbest_texts)} for {len(refs)}")
    tokens = covered = 0
    for ref, hyps in zip(refs, nbest_texts):
        words = set().union(*(h.split() for h in hyps)) if hyps else set()
        for w in ref.split():
            if is_rare(w):
                tokens += 1
                covered += w in words
    return tokens, covered


def oov_rate(texts: Iterable[str], vocab: frozenset[str] | set[str]) -> tuple[int, int]:
    """(OOV word tokens, word tokens) of whitespace-tokenised texts against a vocabulary."""
    oov = total = 0
    for t in texts:
        for w in t.split():
            total += 1
            oov += w not in vocab
    return oov, total
