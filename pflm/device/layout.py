"""The release layout: which device-model tensors a device trains and sends, in a fixed flat order.

Device and server derive the same layout from the same recipe, so a flat update vector is interpreted
identically by the simulator, the Flower adapters, the aggregators and the server optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Entry:
    name: str
    shape: tuple[int, ...]
    vocab_axis: bool  # True: dim 0 is indexed by (the round's selected) vocabulary rows

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def trainable_names(model: nn.Module, lora_rank: int, train_embeddings: bool) -> list[str]:
    """LoRA on: adapters (+ vocab parameters if train_embeddings). LoRA off: every parameter. Sorted by name."""
    vocab = set(model.vocab_parameters())
    names = []
    for name, _ in model.named_parameters():
        if lora_rank > 0:
            is_adapter = "lora_" in name
            if is_adapter or (train_embeddings and name in vocab):
                names.append(name)
        else:
            names.append(name)
    return sorted(names)  # by name: nn.LSTM and Opacus' DPLSTM list their parameters in different orders


class Layout:
    def __init__(self, model: nn.Module, names: list[str]) -> None:
        params = dict(model.named_parameters())
        vocab = set(model.vocab_parameters())
        self.entries = [Entry(n, tuple(params[n].shape), n in vocab) for n in names]
        self.dim = sum(e.numel for e in self.entries)

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[e.name].reshape(-1).float() for e in self.entries])

    def split(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        if vec.numel() != self.dim:
            raise ValueError(f"update has {vec.numel()} values, layout expects {self.dim}")
        out, off = {}, 0
        for e in self.entries:
            out[e.name] = vec[off : off + e.numel].view(e.shape)
            off += e.numel
        return out
