"""The device update: train the round's model on one user's transcripts, return the weight delta.

One `DeviceTrainer` (model + optimizer) is built once from the run's `DeviceSpec` and reused for every simulated
device: per round the server's device state is loaded once; per device only the trainable tensors are reset. The
same object runs inside the in-process simulator and inside the Flower ClientApp; it never reads the recipe.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pflm.device.batching import LocalVocab, device_batches, device_setup
from pflm.device.layout import Layout, trainable_names
from pflm.device.spec import DeviceSpec
from pflm.model.factory import build_model
from pflm.model.losses import LossConfig, UnigramSampler, compute_loss, mean_token_loss
from pflm.tokens import BOS_ID, PAD_ID, UNK_ID


@dataclass
class DeviceResult:
    update: torch.Tensor  # flat float32 delta in the release layout (not yet clipped)
    weight: float
    num_tokens: int
    num_sentences: int
    train_loss: float
    seconds: float
    metrics: dict = field(default_factory=dict)


_MALLOC_TUNED = False
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def tune_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Keep tensors up to 32 MB on the reused malloc heap (glibc only; once per process).

    A simulated device allocates several weight-sized tensors (delta, clipped copy, gradients: 17 MB each for a
    4M-parameter LM). glibc's default hands such blocks back to the kernel on free and page-faults fresh ones
    on the next allocation, which costs more than the arithmetic on them. Returns whether the setting took.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    except (OSError, AttributeError):  # not glibc (musl, macOS): keep the default allocator
        return False
    _MALLOC_TUNED = ok
    return ok


def accelerator(name: str) -> torch.device:
    """The torch device of `device.accelerator`; a one-line ConfigError when CUDA is asked for but absent."""
    if name == "cuda":
        if not torch.cuda.is_available():
            from pflm.errors import ConfigError

            raise ConfigError("device.accelerator=cuda but torch sees no CUDA GPU (torch.cuda.is_available() is "
                              "False); use device.accelerator=cpu or install a CUDA build of torch on a GPU machine")
        return torch.device("cuda")
    return torch.device("cpu")


class DeviceTrainer:
    def __init__(self, spec: DeviceSpec, unigram_counts: np.ndarray | None = None) -> None:
        self.spec = spec
        self.global_vocab_size = spec.vocab_size
        tune_allocator()
        self.local_vocab_size = spec.local_vocab_size
        dp = spec.dpsgd.enabled
        fused = dp and spec.dpsgd.fused_lstm and spec.dpsgd.grad_sample_mode in ("ghost", "hooks")  # fused_dplstm
        self.device = accelerator(spec.training.accelerator)
        self.model = build_model(spec.model, self.local_vocab_size, dp_compatible=dp, fused_dp_lstm=fused)
        self.model.to(self.device)
        names = trainable_names(self.model, spec.model.lora.rank, spec.training.train_embeddings)
        params = dict(self.model.named_parameters())
        for n, p in params.items():
            p.requires_grad_(n in names)
        self.layout = Layout(self.model, names)
        self.trainable = [params[n] for n in names]
        self.unigram_counts = None if unigram_counts is None else np.asarray(unigram_counts, dtype=np.float64)
        d = spec.training
        self.loss_cfg = LossConfig(kind=d.loss, num_samples=d.num_samples, unigram_alpha=d.unigram_alpha)
        if d.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.trainable, lr=d.lr, momentum=d.momentum)
        else:
            self.optimizer = torch.optim.Adam(self.trainable, lr=d.lr)
        self.dpsgd = None
        if dp:
            from pflm.device.dpsgd import DeviceDPSGD

            self.dpsgd = DeviceDPSGD(self)
        self._start: list[torch.Tensor] = []
        self.local_vocab = LocalVocab(spec.vocab_size, None, self.device)
        self.sampler: UnigramSampler | None = None
        self.round = -1

    @torch.no_grad()
    def _delta(self) -> torch.Tensor:
        """Flat float32 (trained - start) of the trainable tensors in layout order, written in one pass each."""
        update = torch.empty(self.layout.dim, dtype=torch.float32, device=self.device)
        off = 0
        for p, p0 in zip(self.trainable, self._start):
            n = p.numel()
            torch.sub(p.detach(), p0, out=update[off : off + n].view_as(p))
            off += n
        return update.cpu()  # no copy on the CPU

    def parameter_count(self) -> int:
        return self.layout.dim

    @torch.no_grad()
    def load_round(self, round_idx: int, device_state: dict[str, torch.Tensor], rows: torch.Tensor | None) -> None:
        """Load the server's model for this round (vocab tensors already restricted to `rows`)."""
        missing = self.model.load_state_dict(device_state, strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            raise ValueError(f"device state mismatch: missing={missing.missing_keys} extra={missing.unexpected_keys}")
        self._start = [p.detach().clone() for p in self.trainable]
        self.local_vocab = LocalVocab(self.global_vocab_size, rows, self.device)
        self.round = round_idx
        if self.spec.training.loss != "full":
            counts = self.unigram_counts if self.unigram_counts is not None else np.ones(self.global_vocab_size)
            local = counts if rows is None else counts[rows.numpy()]
            local = local.copy()
            local[[PAD_ID, UNK_ID, BOS_ID]] = 0.0  # never sample pad/unk/<s> as noise words
            self.sampler = UnigramSampler(local + (local.sum() == 0), alpha=self.spec.training.unigram_alpha)

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Per-sentence mean losses [B] (`pflm.model.losses.compute_loss`)."""
        return compute_loss(self.model, inputs, targets, mask, self.loss_cfg, self.sampler, gen)

    def _batch_loss(self, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Mean loss over the batch's valid target tokens (`pflm.model.losses.mean_token_loss`)."""
        return mean_token_loss(self.model, inputs, targets, mask, self.loss_cfg, self.sampler, gen)

    def train(self, user_id: int, sentences: list[list[int]], device_key: bytes) -> DeviceResult:
        """Local training on one user's sentences (token ids, no <s>/</s>); returns the delta.

        `device_key` (32 secret bytes, one per round and user) is the only source of the device's randomness:
        sentence subset, batch order, noise words and, with DP-SGD, its Poisson batches and Gaussian noise. The
        same key reproduces the same update bit for bit; the public recipe seed plays no part."""
        t0 = time.perf_counter()
        spec, d = self.spec, self.spec.training
        with torch.no_grad():
            for p, p0 in zip(self.trainable, self._start):
                p.copy_(p0)
        self.optimizer.state.clear()
        rng, gen, seqs, lengths = device_setup(
            sentences, device_key, spec.max_sentences, spec.max_tokens
        )
        n = seqs.shape[0]
        self.model.train()
        total_loss, total_tok, steps = 0.0, 0, 0
        if self.dpsgd is not None:
            total_loss, total_tok, steps = self.dpsgd.train(seqs, lengths, gen, device_key)
        else:
            for inputs, targets, mask in device_batches(seqs, lengths, rng, d.epochs, d.batch_size, self.local_vocab):
                loss = self._batch_loss(inputs, targets, mask, gen)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                ntok = int(mask.sum())
                total_loss += float(loss.detach()) * ntok
                total_tok += ntok
                steps += 1
        update = self._delta()
        num_tokens = int((lengths - 1).sum())
        weight = 1.0 if spec.weighting == "uniform" else float(num_tokens)
        metrics = {"local_steps": steps}
        if self.dpsgd is not None:
            metrics.update(self.dpsgd.last_metrics)
        return DeviceResult(
            update=update,
            weight=weight,
            num_tokens=num_tokens,
            num_sentences=n,
            train_loss=total_loss / max(total_tok, 1),
            seconds=time.perf_counter() - t0,
            metrics=metrics,
        )
