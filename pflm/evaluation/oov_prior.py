"""Spread an LM's `<unk>` probability over out-of-vocabulary words with a PUBLIC unigram, for N-best rescoring.

A word-level LM gives every word outside its vocabulary V the probability of `<unk>`, i.e. the mass of *all* OOV
words. In an N-best list that makes a rare wrong word (e.g. "combat" for "called that") look as likely as the whole
unknown tail. The standard fix (open-vocabulary scoring, as in class-based / unk-expansion LMs) is

    log p(w | h) = log p(<unk> | h) + log p_public(w | w not in V)            for w not in V

with a distribution that never saw a training user. Here p_public mixes wordfreq's published English frequencies
(PyPI `wordfreq`, 'large' list: Wikipedia, subtitles, news, books, web; no pflm user data) with a character model
for words wordfreq does not list:

    p_public(w | OOV) = (1 - lam) * f(w) / Z  +  lam * p_char(w),       Z = sum of f(u) over listed u not in V

p_char is a character unigram with a geometric length (stop probability 1 / mean word length), estimated on
wordfreq's word *types* (add-one over the characters seen there plus one "other" class). Both parts are
distributions over strings, so p_public sums to at most one over OOV words and the LM stays normalised.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable, Mapping

from pflm.errors import ConfigError

DEFAULT_CHAR_WEIGHT = 0.1  # lam: share of the OOV mass for words wordfreq does not list


def wordfreq_frequencies() -> dict[str, float]:
    """wordfreq's English 'large' list (word -> frequency per word): public, installed with pflm."""
    import wordfreq

    return wordfreq.get_frequency_dict("en", wordlist="large")


class PublicOOVPrior:
    """log p_public(w | w not in V) for the words outside a vocabulary V; see the module docstring."""

    def __init__(self, vocab: Iterable[str], frequencies: Mapping[str, float] | None = None,
                 char_weight: float = DEFAULT_CHAR_WEIGHT) -> None:
        if not 0.0 < char_weight <= 1.0:
            raise ConfigError(f"char_weight={char_weight} must be in (0, 1]; use e.g. {DEFAULT_CHAR_WEIGHT}")
        freq = dict(frequencies) if frequencies is not None else wordfreq_frequencies()
        self.vocab = frozenset(vocab)
        self.char_weight = char_weight
        self.tail = {w: f for w, f in freq.items() if w not in self.vocab and f > 0}
        self.tail_mass = sum(self.tail.values())
        chars: Counter = Counter()
        for w in freq:
            chars.update(w)
        total_chars = sum(chars.values())
        self.p_stop = len(freq) / total_chars if total_chars else 0.5
        denom = total_chars + len(chars) + 1  # add-one over seen characters and one "other" class
        self.log_char = {c: math.log((n + 1) / denom) for c, n in chars.items()}
        self.log_other = math.log(1 / denom)

    def char_logprob(self, word: str) -> float:
        """log p_char(word): characters i.i.d. from the public character unigram, geometric length >= 1."""
        if not word:
            raise ConfigError("an OOV word must be non-empty")
        lp = sum(self.log_char.get(c, self.log_other) for c in word)
        return lp + math.log(self.p_stop) + (len(word) - 1) * math.log1p(-self.p_stop)

    def logprob(self, word: str) -> float:
        """log p_public(word | word not in V)."""
        listed = (1.0 - self.char_weight) * self.tail.get(word, 0.0) / self.tail_mass if self.tail_mass > 0 else 0.0
        char = self.char_weight * math.exp(self.char_logprob(word))
        return math.log(listed + char) if listed + char > 0 else self.char_logprob(word) + math.log(self.char_weight)
