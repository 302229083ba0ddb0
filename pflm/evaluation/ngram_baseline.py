"""The NON-PRIVATE n-gram baseline of `pflm rescore`: Kneser–Ney trained centrally on the train users' text.

It shows what a neural LM adds over a count model of the same data. It is trained on the private train split with
no noise, so everything it produces is labelled NON-PRIVATE (`PRIVACY_LABEL`) wherever it is printed; it is a
comparison for the operator, never something to release. Out-of-vocabulary words are scored like the neural LM's
(`<unk>` plus the public OOV prior), and by default it uses the neural LM's own vocabulary so both see the same
`<unk>` set.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from pflm.errors import DataError
from pflm.evaluation.kneser_ney import KneserNeyLM
from pflm.evaluation.oov_prior import PublicOOVPrior

PRIVACY_LABEL = "NON-PRIVATE (trained on the train users' text without noise)"


class NgramScorer:
    """A `SentenceScorer` over a KneserNeyLM: natural-log sentence probability with `<s>`/`</s>`."""

    def __init__(self, lm: KneserNeyLM, normalize: Callable[[str], str],
                 oov_prior: PublicOOVPrior | None = None) -> None:
        self.lm = lm
        self._normalize = normalize
        self.oov_prior = oov_prior
        self.vocab = frozenset(w for w in lm.vocab if w not in ("<s>", "</s>", "<unk>"))

    def normalize(self, text: str) -> str:
        return self._normalize(text)

    def score(self, texts: list[str]) -> list[float]:
        out = []
        for t in texts:
            lp, oov = self.lm.sentence_logprob(t)
            if self.oov_prior is not None:
                lp += sum(self.oov_prior.logprob(w) for w in oov)
            out.append(lp)
        return out


def train_texts(data_dir: str | Path, split: str = "train") -> Iterable[str]:
    """Every normalised sentence of one split of a `pflm prepare` store (private for the train split)."""
    from pflm.data.store import FederatedData

    fd = FederatedData.open(data_dir)
    for user in fd.users(split):
        yield from fd.user_texts(split, user)


def train_ngram_baseline(data_dir: str | Path, order: int = 3, vocab: Iterable[str] | None = None,
                         min_count: int = 1) -> tuple[KneserNeyLM, Callable[[str], str]]:
    """(KN model of the store's train text, the store's normaliser). `vocab=None`: train words seen >= min_count."""
    from pflm.data.store import FederatedData

    fd = FederatedData.open(data_dir)
    texts = list(train_texts(data_dir))
    if not texts:
        raise DataError(f"{data_dir} has no train sentences for the n-gram baseline")
    lm = KneserNeyLM.train(texts, order=order, vocab=sorted(vocab) if vocab is not None else None, min_count=min_count)
    return lm, fd.normalizer
