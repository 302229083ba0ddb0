"""Unigram log-probabilities from a public or DP frequency prior: the output-bias init and the unigram baseline."""

from __future__ import annotations

import numpy as np

EOS_SHARE = 10.0  # </s>: about one sentence end per ten words
NEVER = -30.0  # log-probability of pad and <s>, which are never predicted


def prior_log_probs(prior: np.ndarray) -> np.ndarray:
    """log p over the vocabulary (add-one smoothed) from per-id prior counts; ids 0..3 are pad/unk/<s>/</s>."""
    p = np.asarray(prior, dtype=np.float64).copy()
    p[:3] = 0.0
    p[3] = p.sum() / EOS_SHARE
    logp = np.log((p + 1.0) / (p + 1.0).sum())
    logp[0] = logp[2] = NEVER
    return logp
