"""On-device DP-SGD through Opacus: sample-level DP for each of a device's sentences, composed with PEU, LoRA, NCE.

Two different guarantees exist in a run that enables this module; their metrics are named apart on purpose:

* ``device_sample_epsilon`` (this module, per device and round): (ε, δ)-DP of *one device's local training* with
  respect to adding/removing *one of its sentences* (sample-level DP), from Opacus' RDP/PRV accountant for that
  device's Poisson rate q, noise multiplier σ, number of local steps and ``dpsgd.delta``. It says nothing about
  the user as a whole and does not compose over rounds here (each round is a fresh local run).
* ``epsilon`` (the simulator / server): *user-level* DP of the released model over all rounds, from the
  clipping and noise at the aggregator (``privacy.*``).

Mechanics. The device model is wrapped ONCE per `DeviceTrainer` (hooks stack up if a model is wrapped again,
Opacus issue #608) in an Opacus grad-sample module (``hooks``/``functorch``/``ew``: `GradSampleModule` and
`DPOptimizer`; ``ghost``: `GradSampleModuleFastGradientClipping` and `DPOptimizerFastGradientClipping`, i.e. ghost
clipping without per-sample gradients). Per device: Poisson sampling of its sentences at rate q
(``dpsgd.sample_rate`` or batch_size / #sentences), round(epochs / q) steps, per-sentence clipping to
``max_grad_norm``, Gaussian noise σ·max_grad_norm on the sum, division by the expected batch size q·n. An empty
Poisson batch still takes a (noise-only) step, as the accountant assumes.
In ghost mode with an untied output layer, ``dpsgd.fast_ghost`` (default true) computes the same norms and
clipped sum with `pflm.device.dp_fast` (output layer at valid positions only, book-kept clipped sums, one body
backward) and hands them to the same optimizer; tied heads and ``fast_ghost: false`` take Opacus' two passes.

Randomness. The two draws the guarantee rests on, the Poisson batches and the Gaussian noise, come from
``SecureRandom(subkey(device_key, "dpsgd"))`` (ChaCha20 keyed by the device's secret key): batches from stream
(step, "poisson"), the noise of step t from the float32 stream (t, "noise") (`SecureRandom.normal_f32`: the
same 53-bit radius uniforms as float64, arithmetic in float32, ~7x cheaper per coordinate) as ONE draw over all
trainable parameters concatenated in the optimizer's parameter order. `SecureDPOptimizer` / `SecureDPOptimizerFastGradientClipping`
are Opacus' optimizers with only ``add_noise`` replaced (same std, same place: added to ``p.summed_grad``, then
Opacus' ``scale_grad`` divides by the expected batch size); Opacus' torch ``generator`` is never used, and a step
without a key raises instead of falling back to it. With the recipe seed alone nobody can replay the noise or the
batches; the same key replays them exactly (resume). The NCE / sampled-softmax noise words (not privacy-critical)
stay on the torch generator, which is itself seeded from the device key.

The output layer. The trainer's sampled-softmax / NCE losses gather output rows functionally (``weight[ids]``),
which Opacus' module hooks cannot see: those parameters would get no per-sample gradient (hooks mode fails,
ghost mode would clip with a stale or missing norm). Here every use of the output weight/bias goes through
`DPOutputHead`, a module holding the same Parameters with its own Opacus grad sampler (dense [B, V, H], small
under PEU where V = K rows) and ghost norm sampler (exact, over the union of candidate rows only). The loss math
is `pflm.model.losses.token_losses`, the trainer's own (same noise draws for the same generator state).
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from typing import TYPE_CHECKING

import torch
from opacus.grad_sample.utils import prepare_module
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed
from torch import nn

from pflm.device.batching import check_device_key
from pflm.device.dp_head import DPOutputHead
from pflm.device.dp_fast import BodyRecorder, fast_ghost_supported, packed_clipped_step
from pflm.device.ghost import ghost_clipped_backward
from pflm.epsilon import epsilon_from_history
from pflm.errors import ConfigError
from pflm.model.losses import masked_sequence_mean, token_losses
from pflm.secure_random import SecureRandom, subkey

if TYPE_CHECKING:
    from pflm.device.trainer import DeviceTrainer


POISSON_PURPOSE = "poisson"
NOISE_PURPOSE = "noise"


def dpsgd_random(device_key: bytes) -> SecureRandom:
    """The keyed CSPRNG of one device's DP-SGD (Poisson batches and Gaussian noise)."""
    return SecureRandom(subkey(check_device_key(device_key), "dpsgd"))


class _SecureNoise:
    """Replaces Opacus' ``add_noise``: N(0, (σ·max_grad_norm)²) per coordinate from a keyed CSPRNG.

    Same semantics as Opacus 1.6 (``opacus/optimizers/optimizer.py`` and ``optimizer_fast_gradient_clipping.py``):
    the noise is added to ``p.summed_grad`` (clipped sum) into ``p.grad``, the processed flags are checked and set,
    the adaptive-clipping ``_adjusted_noise_multiplier`` is honoured; ``scale_grad`` etc. are Opacus' own. Step t's
    noise for all parameters is one draw from stream (t, "noise"), t counting ``add_noise`` calls since the last
    `set_noise_source`."""

    def set_noise_source(self, source: SecureRandom | None) -> None:
        self.secure_random = source
        self.noise_step = 0
        self.generator = None  # Opacus' own generator is never used

    def add_noise(self) -> None:
        source: SecureRandom | None = getattr(self, "secure_random", None)
        if source is None:
            raise RuntimeError("device DP-SGD has no secret noise source; DeviceDPSGD.train(..., device_key) sets "
                               "one per device (the torch generator is never used for DP noise)")
        nm = getattr(self, "_adjusted_noise_multiplier", self.noise_multiplier)
        std = float(nm) * float(self.max_grad_norm)
        params = self.params
        for p in params:
            _check_processed_flag(p.summed_grad)
        total = sum(p.summed_grad.numel() for p in params)
        step = self.noise_step
        self.noise_step = step + 1
        noise = source.normal_f32(step, total, std, NOISE_PURPOSE) if std > 0 else None
        off = 0
        for p in params:
            g = p.summed_grad
            k = g.numel()
            if noise is None:
                p.grad = (g + 0.0).view_as(p)
            else:  # in place: the clipped sum is not read again (zero_grad drops it); saves a weight-sized copy
                p.grad = g.add_(noise[off : off + k].view(g.shape).to(device=g.device, dtype=g.dtype)).view_as(p)
            off += k
            _mark_as_processed(p.summed_grad)


class SecureDPOptimizer(_SecureNoise, DPOptimizer):
    """Opacus' DPOptimizer (per-sample clipping) with keyed-CSPRNG noise."""


class SecureDPOptimizerFastGradientClipping(_SecureNoise, DPOptimizerFastGradientClipping):
    """Opacus' ghost-clipping optimizer with keyed-CSPRNG noise; `accumulate` takes p.grad without Opacus' deep
    copy (p.grad is the clipped sum of one backward, replaced by the noised one in `add_noise`)."""

    def accumulate(self) -> None:
        for p in self.params:
            if p.summed_grad is not None:
                p.summed_grad.add_(p.grad.data)
            else:
                p.summed_grad = p.grad.data


class _DPNet(nn.Module):
    """What Opacus wraps: the device LM plus its output head; forward -> per-sentence losses [B]."""

    def __init__(self, trainer: DeviceTrainer) -> None:
        super().__init__()
        self.lm = trainer.model
        self.head = DPOutputHead(self.lm.output_weight(), self.lm.output_bias())
        object.__setattr__(self, "_trainer", trainer)  # not a submodule

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                noise: torch.Tensor) -> torch.Tensor:
        """Per-sentence losses [B]: the scores come from Opacus-visible modules (dense [B, T] layout), the loss
        math from `pflm.model.losses.token_losses` (the trainer's own losses, same noise words)."""
        trainer: DeviceTrainer = self._trainer  # type: ignore[assignment]
        h = self.lm.features(inputs)
        kind = trainer.loss_cfg.kind
        if kind == "full":
            out = self.lm.output if self.lm.output is not None else self.head
            tok = token_losses(kind, targets, out(h))
        else:
            sampler = trainer.sampler
            assert sampler is not None, "load_round() builds the noise sampler"
            k = noise.numel()
            cand = torch.cat([noise.unsqueeze(0).expand(inputs.shape[0], -1), targets], dim=1)
            s = self.head(h, cand)  # [B, T, k + T]
            s_t = torch.diagonal(s[..., k:], dim1=1, dim2=2)  # score of each position's own target
            tok = token_losses(kind, targets, (s_t, s[..., :k]), noise, sampler, log_z=trainer.loss_cfg.nce_log_z)
        return masked_sequence_mean(tok, mask)


@functools.lru_cache(maxsize=4096)
def sample_level_epsilon(sample_rate: float, noise_multiplier: float, steps: int, delta: float,
                         accountant: str = "rdp") -> float:
    """ε of `steps` Poisson-subsampled Gaussian steps (rate q, multiplier σ) at δ (`pflm.epsilon`)."""
    if noise_multiplier <= 0 < steps:
        return math.inf
    return epsilon_from_history([(float(noise_multiplier), float(sample_rate), int(steps))], delta, accountant)


def poisson_plan(num_sentences: int, batch_size: int, epochs: int, sample_rate: float) -> tuple[float, int]:
    """(q, steps) for one device: q = sample_rate or min(1, batch_size / n); steps = max(1, round(epochs / q))."""
    q = sample_rate if sample_rate > 0 else min(1.0, batch_size / max(num_sentences, 1))
    return q, max(1, int(round(epochs / q)))


class DeviceDPSGD:
    """DP-SGD for `DeviceTrainer`: wraps its model once, then `train()` runs one device's local DP-SGD."""

    def __init__(self, trainer: DeviceTrainer) -> None:
        t0 = time.perf_counter()
        self.trainer = trainer
        self.cfg = trainer.spec.dpsgd
        mode = self.cfg.grad_sample_mode
        lm = trainer.model
        if not getattr(lm, "dp_compatible", False):
            raise ConfigError("device DP-SGD needs a model built with dp_compatible=True (DeviceTrainer does this "
                              "when dpsgd.enabled=true)")
        tied = lm.output is None
        if mode == "ghost" and tied and lm.embedding.weight.requires_grad:
            raise ConfigError("dpsgd.grad_sample_mode=ghost cannot clip tied embeddings (Opacus refuses shared "
                              "parameters in ghost clipping); set model.tie_embeddings=false or "
                              "dpsgd.grad_sample_mode=hooks")
        if mode in ("functorch", "ew") and trainer.spec.training.loss != "full":
            raise ConfigError(f"dpsgd.grad_sample_mode={mode} cannot compute per-sample gradients of the sampled "
                              f"output rows of device.loss={trainer.spec.training.loss}; use grad_sample_mode=hooks "
                              "or ghost (or device.loss=full)")
        if mode == "ew" and tied:
            raise ConfigError("dpsgd.grad_sample_mode=ew does not support tied embeddings; set "
                              "model.tie_embeddings=false or dpsgd.grad_sample_mode=hooks")
        # The first hooked module (the embedding) takes integer ids, so PyTorch warns on every backward; harmless.
        warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with "
                                "respect to module outputs since no inputs require gradients")
        self.net = _DPNet(trainer)
        kwargs = {"batch_first": True, "loss_reduction": "mean"}
        if mode == "ghost":
            kwargs.update(max_grad_norm=self.cfg.max_grad_norm, use_ghost_clipping=True)
        self.gsm = prepare_module(self.net, mode, True, **kwargs)
        # ghost: the packed head + book-kept clipped sum (pflm.device.dp_fast) unless off or the head is tied
        self.fast = mode == "ghost" and self.cfg.fast_ghost and fast_ghost_supported(lm)
        self.recorder = BodyRecorder(self.gsm) if self.fast else None
        opt_cls = SecureDPOptimizerFastGradientClipping if mode == "ghost" else SecureDPOptimizer
        self.optimizer = opt_cls(trainer.optimizer, noise_multiplier=self.cfg.noise_multiplier,
                                 max_grad_norm=self.cfg.max_grad_norm, expected_batch_size=1,
                                 loss_reduction="mean")
        self.optimizer.set_noise_source(None)  # no noise without a device key
        self.random: SecureRandom | None = None
        self.params = list(self.optimizer.params)
        trainable = {id(p) for p in trainer.trainable}
        if {id(p) for p in self.params} != trainable or any(not p.requires_grad for p in self.params):
            raise RuntimeError("device DP-SGD: the optimizer's parameters differ from the trainable ones")
        self.wrap_seconds = time.perf_counter() - t0
        self.last_metrics: dict[str, float] = {}

    @property
    def hook_count(self) -> int:
        """Opacus hooks currently attached (constant after construction: the model is wrapped once)."""
        return len(getattr(self.gsm, "autograd_grad_sample_hooks", []) or [])

    # ----- one device ------------------------------------------------------------------------------------
    def _reset(self, q: float, n: int, device_key: bytes) -> SecureRandom:
        """Fresh optimizer state for one device; its DP randomness now comes from `device_key`."""
        self.random = dpsgd_random(device_key)
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        opt.state.clear()
        opt._is_last_step_skipped = False
        opt.expected_batch_size = q * n  # Poisson: average the clipped sum by the *expected* batch size
        opt.set_noise_source(self.random)
        for p in self.params:
            p.summed_grad = None
            p.grad_sample = None
            p.__dict__.pop("_norm_sample", None)
            p.__dict__.pop("_current_grad_sample", None)
        return self.random

    def _noise_words(self, gen: torch.Generator) -> torch.Tensor:
        tr = self.trainer
        if tr.loss_cfg.kind == "full":
            return torch.zeros(0, dtype=torch.long)
        assert tr.sampler is not None
        return tr.sampler.sample(tr.loss_cfg.num_samples, generator=gen)

    def _empty_step(self) -> None:
        """A Poisson batch with no sentence: the clipped sum is zero, the step adds noise only."""
        for p in self.params:
            if self.cfg.grad_sample_mode == "ghost":
                p.grad = torch.zeros_like(p)
            else:
                p.grad_sample = p.new_zeros((0, *p.shape))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _step(self, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One clipped+noised step on a non-empty batch; returns (per-sentence losses, per-sentence norms)."""
        noise = self._noise_words(gen)
        if self.fast:
            tr = self.trainer
            per_seq, norms = packed_clipped_step(self.net.lm, self.params, self.gsm, self.cfg.max_grad_norm, inputs,
                                                 targets, mask, noise, tr.loss_cfg.kind, tr.sampler,
                                                 tr.loss_cfg.nce_log_z, self.recorder)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return per_seq, norms
        per_seq = self.gsm(inputs, targets, mask, noise)
        if self.cfg.grad_sample_mode == "ghost":
            for p in self.params:  # a norm left from an earlier step must never be reused
                p.__dict__.pop("_norm_sample", None)
            try:
                head = (self.net.head.weight, self.net.head.bias)  # the output layer: no wasted [V, H] product
                ghost_clipped_backward(self.gsm, self.optimizer, per_seq, skip=[p for p in head if p is not None])
            except AttributeError as e:
                raise RuntimeError("ghost clipping found a trainable parameter without a per-sample norm (used "
                                   "outside an Opacus-visible module); use grad_sample_mode=hooks") from e
            norms = self.gsm.per_sample_gradient_norms.detach()
        else:
            per_seq.mean().backward()
            gs = self.optimizer.grad_samples
            norms = torch.stack([g.reshape(len(g), -1).norm(dim=1) for g in gs], 1).norm(dim=1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return per_seq.detach(), norms

    def train(self, seqs: torch.Tensor, lengths: torch.Tensor, gen: torch.Generator,
              device_key: bytes) -> tuple[float, int, int]:
        """Local DP-SGD on one device's packed sentences; returns (token-weighted loss sum, tokens, steps).

        Poisson batches and noise come from `device_key` (see the module doc); `gen` only draws NCE noise words."""
        t0 = time.perf_counter()
        tr, c = self.trainer, self.cfg
        n = int(seqs.shape[0])
        q, steps = poisson_plan(n, tr.spec.training.batch_size, tr.spec.training.epochs, c.sample_rate)
        source = self._reset(q, n, device_key)
        setup = time.perf_counter() - t0
        total_loss, total_tok, empty, clipped, seen = 0.0, 0, 0, 0, 0
        for step in range(steps):
            idx = torch.from_numpy(source.bernoulli(step, n, q, POISSON_PURPOSE))
            if idx.numel() == 0:
                self._empty_step()
                empty += 1
                continue
            inputs, targets, mask = tr.local_vocab.batch(seqs[idx], lengths[idx])
            per_seq, norms = self._step(inputs, targets, mask, gen)
            ntok = mask.sum(1)
            total_loss += float((per_seq * ntok).sum())
            total_tok += int(ntok.sum())
            clipped += int((norms > c.max_grad_norm).sum())
            seen += int(norms.numel())
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.set_noise_source(None)  # the next device must bring its own key
        self.last_metrics = {
            "device_sample_epsilon": sample_level_epsilon(q, c.noise_multiplier, steps, c.delta, c.accountant),
            "device_sample_delta": c.delta,
            "device_sample_rate": q,
            "device_dp_steps": float(steps),
            "device_dp_empty_batches": float(empty),
            "device_dp_fraction_clipped": clipped / max(seen, 1),  # diagnostic only: not privatised
            "device_dp_setup_seconds": setup,
            "device_dp_wrap_seconds": self.wrap_seconds,  # one-time cost, paid when the trainer was built
        }
        return total_loss, total_tok, steps


__all__ = ["DPOutputHead", "DeviceDPSGD", "SecureDPOptimizer", "SecureDPOptimizerFastGradientClipping", "dpsgd_random",
           "poisson_plan", "sample_level_epsilon"]
