"""A word vocabulary and frequency prior learned from the train users under DP (Gaussian thresholded histogram).

Mechanism (Gopi et al. 2020, "Differentially Private Set Union", Gaussian policy with k-capping; used for
tokenizers by Bagdasaryan et al. 2022, "Training a Tokenizer for Free with Private Federated Learning"):

1. every train user contributes at most `k` distinct words (their k most frequent; ties broken by the word's
   string order), each with weight 1/sqrt(k), so one user's contribution has L2 norm <= 1;
2. N(0, sigma^2) noise, drawn from a fresh CSPRNG key (never from the seed), is added to the weighted count of
   every word that occurs;
3. only words whose noisy count exceeds rho are released, where
   delta_threshold = k * Phi_bar((rho - 1/sqrt(k)) / sigma) is the requested `threshold_delta`;
4. the `max_size` words with the largest noisy counts are kept; their noisy counts (times sqrt(k), i.e. an
   estimate of how many users have the word among their top k) are the prior.

Under add/remove-one-user adjacency the released (words, noisy counts) are (epsilon, delta_G + delta_threshold)-DP,
where (epsilon, delta_G) is the Gaussian mechanism's curve at noise multiplier sigma (sensitivity 1, one release,
no sampling). epsilon is not computed here: the training run composes `release_record()` into its accountant.
See docs/vocabulary.md.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Iterable, Sequence

import numpy as np

from pflm.errors import ConfigError, DataError
from pflm.secure_random import SecureRandom, new_key

MECHANISM = "gaussian_thresholded_histogram"
NOISE_PURPOSE = "dp-vocab"
MAX_WORD_CHARS = 512  # SentencePiece's max piece length (pflm.data.tokenizer.MAX_PIECE_CHARS)
_TSV_SCALE = 1000.0  # SentencePiece's TSV input wants integer counts: noisy user counts in 1/1000 units


@dataclass(frozen=True)
class DPVocabConfig:
    """Parameters of the DP vocabulary release (`pflm prepare --vocab-source dp --vocab-dp-*`)."""

    noise_multiplier: float  # sigma: std of the noise on each weighted count (L2 sensitivity is 1)
    max_words_per_user: int = 8  # k: distinct words one user may contribute
    threshold_delta: float = 1e-8  # probability budget for releasing a word only one user has
    prior_floor: float = 1e-3  # lower clamp of the released prior (noisy counts can in principle be tiny)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ConfigError(f"--vocab-dp-sigma must be a finite number > 0, got {self.noise_multiplier}")
        if self.max_words_per_user < 1:
            raise ConfigError(f"--vocab-dp-max-words must be >= 1, got {self.max_words_per_user}")
        if not 0 < self.threshold_delta < 1:
            raise ConfigError(f"--vocab-dp-threshold-delta must be in (0, 1), e.g. 1e-8; got {self.threshold_delta}")
        if not self.prior_floor > 0:
            raise ConfigError(f"prior floor must be > 0, got {self.prior_floor}")

    @property
    def threshold(self) -> float:
        """rho with k * Phi_bar((rho - 1/sqrt(k)) / sigma) = threshold_delta."""
        k = self.max_words_per_user
        return 1.0 / math.sqrt(k) - self.noise_multiplier * NormalDist().inv_cdf(self.threshold_delta / k)


def threshold_delta(rho: float, sigma: float, k: int) -> float:
    """delta_threshold = k * Phi_bar((rho - 1/sqrt(k)) / sigma): chance one user's unique words leak past rho."""
    return k * NormalDist().cdf(-(rho - 1.0 / math.sqrt(k)) / sigma)


def user_top_words(texts: Iterable[str], k: int) -> list[str]:
    """The user's k most frequent words (count descending, then string order), usable as SentencePiece pieces."""
    counts = Counter(w for t in texts for w in t.split() if len(w) <= MAX_WORD_CHARS and "\u2581" not in w)
    return [w for w, _ in sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))[:k]]


def users_per_word(users: Iterable[Sequence[str]], k: int) -> Counter[str]:
    """How many users have each word among their top k (the histogram is this times 1/sqrt(k))."""
    hist: Counter[str] = Counter()
    for texts in users:
        hist.update(user_top_words(texts, k))
    return hist


@dataclass(frozen=True)
class DPVocab:
    """The released words (largest noisy count first) and their DP prior (estimated users, >= the floor)."""

    words: list[str]
    prior: np.ndarray  # float64 [len(words)]
    cfg: DPVocabConfig
    users: int
    requested_size: int

    def tokenizer_counts(self) -> list[tuple[str, int]]:
        """Integer pseudo-counts for SentencePiece (its piece scores are then log of the DP prior)."""
        return [(w, max(1, int(round(p * _TSV_SCALE)))) for w, p in zip(self.words, self.prior)]

    def prior_by_word(self) -> dict[str, float]:
        return dict(zip(self.words, self.prior.tolist()))

    def release_record(self) -> dict[str, Any]:
        """What the training run's accountant composes: one unsampled Gaussian release, plus threshold_delta."""
        c = self.cfg
        return {
            "mechanism": MECHANISM, "noise_multiplier": c.noise_multiplier, "sampling_rate": 1.0, "count": 1,
            "threshold_delta": c.threshold_delta, "threshold": c.threshold,
            "max_words_per_user": c.max_words_per_user, "users": self.users,
            "adjacency": "add/remove one user", "words_released": len(self.words),
            "vocab_words_requested": self.requested_size,
        }


def dp_vocabulary(users: Sequence[Sequence[str]], cfg: DPVocabConfig, max_size: int,
                  rng: SecureRandom | None = None) -> DPVocab:
    """Release at most `max_size` words of the train users (one text list per user) under `cfg` (see module doc).

    `rng` defaults to a fresh OS-keyed CSPRNG; pass one only in tests. Raises DataError when no word passes the
    threshold (that outcome is itself DP: it depends only on the noisy histogram)."""
    if max_size < 1:
        raise ConfigError(f"DP vocabulary size must leave room for words after the 4 specials, got {max_size}")
    k = cfg.max_words_per_user
    hist = users_per_word(users, k)
    words = sorted(hist)  # a fixed order, so each noise draw is tied to a word independently of the data order
    counts = np.fromiter((hist[w] for w in words), dtype=np.float64, count=len(words)) / math.sqrt(k)
    rng = rng or SecureRandom(new_key())
    noisy = counts + cfg.noise_multiplier * rng.standard_normal(0, len(words), NOISE_PURPOSE).numpy()
    above = np.flatnonzero(noisy > cfg.threshold)
    order = above[np.argsort(-noisy[above], kind="stable")][:max_size]
    if order.size == 0:
        raise DataError(
            f"no word passed the DP vocabulary threshold (rho={cfg.threshold:.3g} for sigma="
            f"{cfg.noise_multiplier}, k={k}, delta={cfg.threshold_delta:g}) with {len(users)} train users; lower "
            "--vocab-dp-sigma, use more users, or use --tokenizer-input wordfreq (public vocabulary)"
        )
    prior = np.maximum(noisy[order] * math.sqrt(k), cfg.prior_floor)
    return DPVocab(words=[words[i] for i in order], prior=prior, cfg=cfg, users=len(users), requested_size=max_size)
