"""Turn one user's token lists into padded next-token batches in the device's local (PEU) id space.

`device_setup` + `device_batches` are THE definition of what a simulated device trains on in one round
(sentence subset, order, batch shapes); the trainer and the speed benchmark's plain-torch floor both use them,
so the floor trains on exactly the same token batches as the federated round.

Every random choice of a device comes from its secret 32-byte `device_key` (one per round and user: a fresh
`new_key()` on a real device, `subkey(run_key, "device", round, user)` in the simulator), never from the recipe's
public seed: an observer who knows the recipe cannot replay which sentences a device used or in what order.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from pflm.errors import ConfigError
from pflm.secure_random import KEY_BYTES, subkey
from pflm.tokens import BOS_ID, EOS_ID, UNK_ID


def pack_sentences(sentences: list[list[int]], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, L+1] int64 sequences `<s> w1..wL </s>` (padded with 0) and their lengths (tokens incl. <s>, </s>)."""
    n = len(sentences)
    lens = np.fromiter((min(len(s), max_tokens) for s in sentences), dtype=np.int64, count=n)
    lengths = torch.from_numpy(lens + 2)
    width = int(lens.max()) + 2 if n else 2
    out = np.zeros((n, width), dtype=np.int64)
    out[:, 0] = BOS_ID
    for i, s in enumerate(sentences):
        k = int(lens[i])
        out[i, 1 : k + 1] = s[:k]
    out[np.arange(n), lens + 1] = EOS_ID
    return torch.from_numpy(out), lengths


def check_device_key(device_key: bytes) -> bytes:
    """The device's secret key, validated: 32 bytes (an int seed or a short key is refused, never stretched)."""
    if not isinstance(device_key, (bytes, bytearray)) or len(device_key) != KEY_BYTES:
        raise ConfigError(f"device_key must be {KEY_BYTES} secret bytes (new_key() on a device, "
                          f"subkey(run_key, 'device', round, user) in a simulation), got {type(device_key).__name__}")
    return bytes(device_key)


def device_generators(device_key: bytes) -> tuple[np.random.Generator, torch.Generator]:
    """(numpy rng, torch generator) of one device, seeded from independent subkeys of its secret key.

    The numpy generator gets all 256 bits of its subkey (SeedSequence entropy); torch's generator takes a
    63-bit seed. Neither is a CSPRNG: they drive only the sentence subset, the batch order and the loss' noise
    words; the privacy-critical draws (DP-SGD batches and noise) use `SecureRandom` directly."""
    key = check_device_key(device_key)
    rng = np.random.default_rng(np.frombuffer(subkey(key, "device/numpy"), dtype="<u4").astype(np.uint32))
    gen = torch.Generator().manual_seed(int.from_bytes(subkey(key, "device/torch")[:8], "little") >> 1)
    return rng, gen


def device_setup(
    sentences: list[list[int]], device_key: bytes, max_sentences: int, max_tokens: int
) -> tuple[np.random.Generator, torch.Generator, torch.Tensor, torch.Tensor]:
    """The device's random streams and its packed training sentences for one round.

    Returns (rng, gen, seqs, lengths): `rng` (numpy) drives the sentence subset and batch order, `gen` (torch)
    the loss' noise draws; both depend only on the secret `device_key` (see `device_generators`). At most
    `max_sentences` sentences (0 = all) are kept, chosen by `rng` and kept in their original order.
    """
    rng, gen = device_generators(device_key)
    if max_sentences and len(sentences) > max_sentences:
        keep = rng.choice(len(sentences), max_sentences, replace=False)
        sentences = [sentences[i] for i in sorted(keep)]
    seqs, lengths = pack_sentences(sentences, max_tokens)
    return rng, gen, seqs, lengths


def device_batches(
    seqs: torch.Tensor, lengths: torch.Tensor, rng: np.random.Generator, epochs: int, batch_size: int, local_vocab: "LocalVocab"
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(inputs, targets, mask) of each local SGD step: a fresh permutation per epoch, batches of `batch_size`
    sentences trimmed to their longest member; batches without any valid target are skipped."""
    n = int(seqs.shape[0])
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(n))
        for s in range(0, n, batch_size):
            idx = order[s : s + batch_size]
            inputs, targets, mask = local_vocab.batch(seqs[idx], lengths[idx])
            if not bool(mask.any()):
                continue
            yield inputs, targets, mask


class LocalVocab:
    """Maps global token ids to a device's local ids for the round's selected rows (PEU)."""

    def __init__(self, vocab_size: int, rows: torch.Tensor | None, device: torch.device | str = "cpu") -> None:
        self.rows = rows
        self.device = torch.device(device)  # where batches are handed out (the trainer's accelerator)
        if rows is None:
            self.g2l = None
            self.selected = None
        else:
            self.g2l = torch.full((vocab_size,), UNK_ID, dtype=torch.long)
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
        if self.device.type != "cpu":
            return (inputs.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True),
                    mask.to(self.device, non_blocking=True))
        return inputs.contiguous(), targets.contiguous(), mask
