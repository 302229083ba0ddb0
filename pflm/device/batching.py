"""Turn one user's token lists into padded next-token batches in the device's local (PEU) id space."""

from __future__ import annotations

import numpy as np
import torch

PAD, UNK, BOS, EOS = 0, 1, 2, 3


def pack_sentences(sentences: list[list[int]], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, L+1] int64 sequences `<s> w1..wL </s>` (padded with 0) and their lengths (tokens incl. <s>, </s>)."""
    seqs = [[BOS, *s[:max_tokens], EOS] for s in sentences]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    width = int(lengths.max()) if len(seqs) else 2
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return torch.from_numpy(out), lengths


class LocalVocab:
    """Maps global token ids to a device's local ids for the round's selected rows (PEU)."""

    def __init__(self, vocab_size: int, rows: torch.Tensor | None) -> None:
        self.rows = rows
        if rows is None:
            self.g2l = None
            self.selected = None
        else:
            self.g2l = torch.full((vocab_size,), UNK, dtype=torch.long)
            self.g2l[rows] = torch.arange(rows.numel())
            self.selected = torch.zeros(vocab_size, dtype=torch.bool)
            self.selected[rows] = True

    def batch(self, seqs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """inputs [B,T], targets [B,T], mask [B,T] (False on padding and on targets outside the selected rows)."""
        width = int(lengths.max())
        seqs = seqs[:, :width]
        inputs, targets = seqs[:, :-1], seqs[:, 1:]
        mask = torch.arange(width - 1).unsqueeze(0) < (lengths - 1).unsqueeze(1)
        if self.g2l is not None:
            mask = mask & self.selected[targets]
            inputs, targets = self.g2l[inputs], self.g2l[targets]
        return inputs.contiguous(), targets.contiguous(), mask
