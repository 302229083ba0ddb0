"""Partial Embedding Updates: the server's DP-valid choice of which K vocabulary rows a round releases.

The choice never looks at any device's data: `topk` takes the K most frequent tokens of a *prior*, `sampled`
draws K rows per round from the server's own randomness (uniform or prior-weighted), `all` releases every row.
The prior is the data's public or DP frequency prior (`prior_counts.npy` from `pflm prepare`: a public word
list, a public text file, or a DP histogram of the training users); DP runs refuse data whose prior is the
training users' exact counts (docs/peu.md). Special tokens (pad, unk, <s>, </s>) are always selected.
"""

from __future__ import annotations

import numpy as np
import torch

from pflm.config import PEUConfig
from pflm.errors import ConfigError
from pflm.tokens import NUM_SPECIAL  # pad=0, unk=1, bos=2, eos=3


class RowSelector:
    def __init__(self, cfg: PEUConfig, vocab_size: int, prior_counts: np.ndarray | None, seed: int) -> None:
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.seed = seed
        if cfg.mode != "all" and cfg.k > vocab_size:
            raise ConfigError(f"peu.k={cfg.k} exceeds the vocabulary size {vocab_size}; lower peu.k or use peu.mode=all")
        counts = np.ones(vocab_size) if prior_counts is None else np.asarray(prior_counts, dtype=np.float64)
        if counts.shape != (vocab_size,):
            raise ConfigError(f"PEU prior has {counts.shape[0]} entries but the vocabulary has {vocab_size}")
        self.prior = counts
        self._fixed: torch.Tensor | None = None
        if cfg.mode == "topk":
            order = np.argsort(-counts[NUM_SPECIAL:], kind="stable")[: cfg.k - NUM_SPECIAL] + NUM_SPECIAL
            self._fixed = torch.as_tensor(np.sort(np.concatenate([np.arange(NUM_SPECIAL), order])), dtype=torch.long)

    @property
    def k(self) -> int:
        return self.vocab_size if self.cfg.mode == "all" else self.cfg.k

    def select(self, round_idx: int) -> torch.Tensor | None:
        """Sorted global row ids for this round (None = all rows). Depends only on (seed, round, prior)."""
        if self.cfg.mode == "all":
            return None
        if self.cfg.mode == "topk":
            return self._fixed
        rng = np.random.default_rng([self.seed, round_idx, 0x9E0])
        pool = np.arange(NUM_SPECIAL, self.vocab_size)
        if self.cfg.prior == "uniform":
            p = None
        else:
            w = self.prior[NUM_SPECIAL:] + 1.0
            p = w / w.sum()
        nonzero = self.vocab_size - NUM_SPECIAL if p is None else int((p > 0).sum())
        chosen = rng.choice(pool, size=min(self.cfg.k - NUM_SPECIAL, nonzero), replace=False, p=p)
        rows = np.sort(np.concatenate([np.arange(NUM_SPECIAL), chosen]))
        return torch.as_tensor(rows, dtype=torch.long)
