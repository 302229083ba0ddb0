"""Unigram log-probabilities from a public or DP frequency prior: the output-bias init and the unigram baseline."""

from __future__ import annotations

import numpy as np
import torch

from pflm.tokens import BOS_ID, EOS_ID, PAD_ID, UNK_ID

EOS_SHARE = 10.0  # </s>: about one sentence end per ten words
NEVER = -30.0  # log-probability of pad and <s>, which are never predicted


def prior_log_probs(prior: np.ndarray) -> np.ndarray:
    """log p over the vocabulary (add-one smoothed) from per-id prior counts (special ids: pflm.tokens)."""
    p = np.asarray(prior, dtype=np.float64).copy()
    p[[PAD_ID, UNK_ID, BOS_ID]] = 0.0
    p[EOS_ID] = p.sum() / EOS_SHARE
    logp = np.log((p + 1.0) / (p + 1.0).sum())
    logp[PAD_ID] = logp[BOS_ID] = NEVER
    return logp


@torch.no_grad()
def init_output_bias(model: torch.nn.Module, prior: np.ndarray) -> None:
    """Set the model's output bias to the log unigram prior (`prior_log_probs`), e.g. before training starts."""
    model.output_bias().copy_(torch.as_tensor(prior_log_probs(prior), dtype=torch.float32))  # type: ignore[operator]
