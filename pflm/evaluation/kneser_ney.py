"""A compact interpolated modified Kneser–Ney n-gram LM (Chen & Goodman 1998): train from text, query, write ARPA.

Used as the **non-private** n-gram baseline of `pflm rescore` (it is trained on the train users' text without any
noise; its scores must never be presented as private). KenLM's `lmplz` does the same job but is not installable
here; the `kenlm` Python module only queries ARPA files, which is how `scripts/asr_results.py --kenlm` checks this one.

Counts follow KenLM's recipe: the highest order and n-grams starting with `<s>` keep their raw counts; every other
n-gram gets its continuation count (how many distinct words precede it). Per order, three discounts D1, D2, D3+ come
from the count-of-counts n1..n4 of those adjusted counts: Y = n1 / (n1 + 2 n2), D_j = j - (j + 1) Y n_{j+1} / n_j.

    p_k(w | h) = max(a(h w) - D(a(h w)), 0) / S(h) + gamma(h) p_{k-1}(w | h'),
    gamma(h)   = (D1 N1(h) + D2 N2(h) + D3 N3+(h)) / S(h),           S(h) = sum_w a(h w)

with p_0 uniform over the vocabulary (every word, `<unk>` and `</s>`; `<s>` is never predicted). A context never
seen at order k backs off with weight 1. The tables hold exactly the ARPA semantics: interpolated probabilities of
seen n-grams and the backoff weights gamma of seen contexts, so `logprob` and a written ARPA file agree.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable, Sequence

from pflm.errors import ConfigError, DataError
from pflm.io_utils import atomic_write_text

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def _discounts(adjusted: Iterable[int]) -> tuple[float, float, float]:
    """Modified-KN discounts (D1, D2, D3+) from the count-of-counts of one order's adjusted counts."""
    coc = Counter(min(c, 4) for c in adjusted)
    n1, n2, n3, n4 = (coc.get(j, 0) for j in (1, 2, 3, 4))
    if n1 == 0 or n2 == 0:  # too little data for the estimate: fall back to Kneser–Ney's single D = 0.5 per count
        return 0.5, 1.0, 1.5
    y = n1 / (n1 + 2 * n2)
    d = [1 - 2 * y * n2 / n1, 2 - 3 * y * n3 / n2, 3 - 4 * y * n4 / n3 if n3 else 2.5]
    # each D_j must lie in [0, j] so that a(h w) - D >= 0 and the distribution sums to one
    return tuple(min(max(x, 0.0), float(j)) for j, x in zip((1, 2, 3), d))  # type: ignore[return-value]


class KneserNeyLM:
    """An order-N interpolated modified Kneser–Ney model over a fixed vocabulary (others map to `<unk>`)."""

    def __init__(self, order: int, vocab: Sequence[str]) -> None:
        if order < 1:
            raise ConfigError(f"n-gram order {order} must be >= 1; use e.g. 3")
        self.order = order
        words = [w for w in dict.fromkeys(vocab) if w not in (BOS, EOS, UNK)]
        self.vocab: list[str] = [UNK, BOS, EOS] + words
        self.index = {w: i for i, w in enumerate(self.vocab)}
        # prob[k][ngram of k ids] = natural-log interpolated probability; bow[k][context of k ids] = log gamma
        self.prob: list[dict[tuple[int, ...], float]] = [{} for _ in range(order + 1)]
        self.bow: list[dict[tuple[int, ...], float]] = [{} for _ in range(order + 1)]
        self.discounts: list[tuple[float, float, float]] = []

    # ---- training -------------------------------------------------------------------------------------------
    def ids(self, words: Sequence[str]) -> list[int]:
        get, unk = self.index.get, self.index[UNK]
        return [get(w, unk) for w in words]

    @classmethod
    def train(cls, sentences: Iterable[str], order: int = 3, vocab: Sequence[str] | None = None,
              min_count: int = 1) -> "KneserNeyLM":
        """Count and estimate from whitespace-tokenised sentences. Without `vocab`, every word seen at least
        `min_count` times is in the vocabulary; the others become `<unk>` (which then has counts of its own)."""
        sentences = [s.split() for s in sentences]
        if not any(sentences):
            raise DataError("the n-gram LM needs training text; the sentences are empty")
        if vocab is None:
            freq = Counter(w for s in sentences for w in s)
            vocab = sorted(w for w, c in freq.items() if c >= min_count)
        lm = cls(order, vocab)
        bos, eos = lm.index[BOS], lm.index[EOS]
        raw: list[Counter] = [Counter() for _ in range(order + 1)]
        for s in sentences:
            toks = [bos] + lm.ids(s) + [eos]
            for i in range(1, len(toks)):
                for k in range(1, min(order, i + 1) + 1):
                    raw[k][tuple(toks[i - k + 1 : i + 1])] += 1
        lm._estimate(raw)
        return lm

    def _estimate(self, raw: list[Counter]) -> None:
        n, bos = self.order, self.index[BOS]
        adjusted: list[dict[tuple[int, ...], int]] = [{} for _ in range(n + 1)]
        adjusted[n] = dict(raw[n])
        for k in range(n - 1, 0, -1):
            left: Counter = Counter(g[1:] for g in raw[k + 1])  # distinct left extensions of each k-gram
            adjusted[k] = {g: (c if g[0] == bos else left.get(g, 0)) for g, c in raw[k].items()}
            adjusted[k] = {g: c for g, c in adjusted[k].items() if c > 0}
        self.discounts = [(0.0, 0.0, 0.0)] + [_discounts(adjusted[k].values()) for k in range(1, n + 1)]
        v = len(self.vocab) - 1  # <s> is never predicted
        lower = [math.log(1.0 / v)]  # p_0
        for k in range(1, n + 1):
            d = self.discounts[k]
            total: dict[tuple[int, ...], float] = defaultdict(float)
            mass: dict[tuple[int, ...], float] = defaultdict(float)
            for g, c in adjusted[k].items():
                total[g[:-1]] += c
                mass[g[:-1]] += d[min(c, 3) - 1]
            gamma = {h: mass[h] / total[h] for h in total}
            probs: dict[tuple[int, ...], float] = {}
            for g, c in adjusted[k].items():
                h = g[:-1]
                p = max(c - d[min(c, 3) - 1], 0.0) / total[h] + gamma[h] * math.exp(self._lower(g[1:], lower))
                probs[g] = math.log(p)
            if k == 1:  # every vocabulary word gets a unigram (unseen ones: the uniform share only)
                for i in range(len(self.vocab)):
                    if i != bos and (i,) not in probs:
                        probs[(i,)] = math.log(gamma.get((), 1.0) / v)
            self.prob[k] = probs
            self.bow[k - 1] = {h: math.log(gm) for h, gm in gamma.items() if gm > 0}
            lower = probs  # type: ignore[assignment]
        self.bow[n] = {}

    def _lower(self, g: tuple[int, ...], lower) -> float:
        if not g:
            return lower[0]
        return self.logprob_ids(g[:-1], g[-1])

    # ---- querying -------------------------------------------------------------------------------------------
    def logprob_ids(self, context: Sequence[int], word: int) -> float:
        """Natural-log p(word | context), ARPA backoff over the stored tables."""
        context = tuple(context[-(self.order - 1) :]) if self.order > 1 else ()
        backoff = 0.0
        for k in range(len(context) + 1, 0, -1):
            h = context[len(context) - (k - 1) :]
            p = self.prob[k].get(h + (word,))
            if p is not None:
                return backoff + p
            backoff += self.bow[k - 1].get(h, 0.0)
        raise DataError(f"word id {word} has no unigram; it is not in the n-gram vocabulary")

    def sentence_logprob(self, text: str) -> tuple[float, list[str]]:
        """(natural-log probability of `<s> text </s>`, the words scored as `<unk>`)."""
        words = text.split()
        toks = [self.index[BOS]] + self.ids(words) + [self.index[EOS]]
        total = sum(self.logprob_ids(toks[max(0, i - self.order + 1) : i], toks[i]) for i in range(1, len(toks)))
        unk = self.index[UNK]
        return total, [w for w, t in zip(words, toks[1:-1]) if t == unk]

    # ---- ARPA -----------------------------------------------------------------------------------------------
    def to_arpa(self) -> str:
        lines = ["", "\\data\\"]
        lines += [f"ngram {k}={len(self.prob[k]) + (1 if k == 1 else 0)}" for k in range(1, self.order + 1)]
        ln10 = math.log(10)
        for k in range(1, self.order + 1):
            lines += ["", f"\\{k}-grams:"]
            rows = sorted(self.prob[k].items())
            if k == 1:
                rows = [((self.index[BOS],), None)] + rows  # type: ignore[list-item]
            for g, p in rows:
                lp = -99.0 if p is None else p / ln10
                text = " ".join(self.vocab[i] for i in g)
                bo = self.bow[k].get(g) if k < self.order else None
                lines.append(f"{lp:.7f}\t{text}" + (f"\t{bo / ln10:.7f}" if bo is not None else ""))
        lines += ["", "\\end\\", ""]
        return "\n".join(lines)

    def write_arpa(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        atomic_write_text(path, self.to_arpa())
        return path
