"""Many simulated devices per kernel: a group of devices trained as one batched computation over stacked weights.

`device.vectorize: G` trains G devices of a round at once. Every device keeps its own weights (stacked on a
leading device dimension) and its own batches (built by the same `device_setup` / `device_batches` calls as
`DeviceTrainer.train`, from its own secret key); at local step s the G devices' s-th batches are padded to one
shape and `torch.func.vmap(grad_and_value(loss))` computes the G gradients in one pass, then one SGD update
`w -= lr * g` runs on the stacked weights. A device with fewer steps gets an all-padding batch whose gradient is
exactly zero, so its weights stay bit-for-bit where they were.

The loss is the trainer's full-softmax loss written as a pure function of the parameters: the LSTM recurrence
by hand (nn.LSTM's fused kernel has no vmap rule and would fall back to a per-device loop), logits only at the
valid positions of each device (gathered by a padded index, so padding positions cost nothing in the 10k-way
softmax), cross entropy averaged over the device's valid tokens. It equals the sequential trainer's update up to
float rounding (the fused kernel and the hand-written recurrence sum in different orders):
`tests/test_vectorised_devices.py` checks max |Δ_vec − Δ_seq| ≤ 1e-5 · max |Δ_seq| + 1e-7 per device, with PEU,
LoRA and clipping. Unsupported settings are refused with one line (`check_vectorizable`): sampled-softmax/NCE (their
noise words are per-device generator draws inside the loss), DP-SGD (Opacus' per-sample machinery wraps one model),
Adam/momentum (optimizer state per device is not implemented), dropout, and non-LSTM models.
"""

from __future__ import annotations

import re
import time

import torch
import torch.nn.functional as F
from torch.func import grad_and_value, vmap

from pflm.device.batching import device_batches, device_setup
from pflm.device.spec import DeviceSpec
from pflm.device.trainer import DeviceResult, DeviceTrainer
from pflm.errors import ConfigError
from pflm.tokens import PAD_ID

_KNOWN = re.compile(r"^(embedding\.weight|output\.(weight|bias)|output_bias|proj\.(weight|bias)|"
                    r"rnn\.(weight|bias)_(ih|hh)_l\d+|rnn\.l\d+\.(ih|hh)\.lora_[AB]\.weight)$")


def check_vectorizable(spec: DeviceSpec) -> None:
    """One-line ConfigError naming the setting `device.vectorize > 1` cannot train, and why."""
    d, m = spec.training, spec.model
    why = None
    if m.arch != "lstm":
        why = f"model.arch={m.arch} (only the LSTM LM has a batched recurrence here)"
    elif m.dropout > 0:
        why = "model.dropout > 0 (per-device dropout masks would not match sequential training)"
    elif d.loss != "full":
        why = f"device.loss={d.loss} (its noise words are per-device generator draws inside the loss)"
    elif d.optimizer != "sgd" or d.momentum:
        why = "device.optimizer other than plain SGD (no per-device optimizer state is kept)"
    elif spec.dpsgd.enabled:
        why = "dpsgd.enabled (Opacus' per-sample clipping wraps one model)"
    if why:
        raise ConfigError(f"device.vectorize > 1 does not support {why}; set device.vectorize=1")


def _lstm_layer(x: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor,
                b_hh: torch.Tensor) -> torch.Tensor:
    """nn.LSTM's layer (gates i, f, g, o; zero initial state) for batch-first x [B, T, in] -> h [B, T, H]."""
    hidden = w_hh.shape[1]
    xg = F.linear(x, w_ih, b_ih + b_hh)
    h = x.new_zeros(x.shape[0], hidden)
    c = x.new_zeros(x.shape[0], hidden)
    outs = []
    for t in range(x.shape[1]):
        i, f, g, o = (xg[:, t] + F.linear(h, w_hh)).chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, dim=1)


class VectorizedDevices:
    """Trains groups of devices for one `DeviceTrainer` (its round state, vocabulary and layout)."""

    def __init__(self, trainer: DeviceTrainer) -> None:
        check_vectorizable(trainer.spec)
        self.trainer = trainer
        self.names = [e.name for e in trainer.layout.entries]
        params = dict(trainer.model.named_parameters())
        unknown = [n for n in params if not _KNOWN.match(n)]
        if unknown:
            raise ConfigError(f"device.vectorize > 1 does not know parameter {unknown[0]!r} (LoRA only on the "
                              "LSTM: model.lora.targets=[rnn]); set device.vectorize=1")
        self.layers = trainer.spec.model.num_layers
        self.lora_scale: dict[str, float] = {}
        for w, adapter in trainer.model.fused_lora_adapters().items():  # "weight_ih_l0" -> LoRAFactors
            kind, layer = w.split("_")[1], w.split("_l")[1]
            self.lora_scale[f"rnn.l{layer}.{kind}"] = float(adapter.scale)
        self._grad = vmap(grad_and_value(self._loss), in_dims=(0, None, 0, 0, 0, 0))

    def _loss(self, train: dict[str, torch.Tensor], frozen: dict[str, torch.Tensor], x: torch.Tensor,
              y: torch.Tensor, idx: torch.Tensor, wts: torch.Tensor) -> torch.Tensor:
        p = {**frozen, **train}
        h = p["embedding.weight"][x]  # indexing: a scatter-add backward (F.embedding's vmap rule is dense)
        for k in range(self.layers):
            w = {kind: p[f"rnn.weight_{kind}_l{k}"] for kind in ("ih", "hh")}
            for kind in ("ih", "hh"):
                pre = f"rnn.l{k}.{kind}"
                if pre in self.lora_scale:
                    w[kind] = w[kind] + self.lora_scale[pre] * (p[pre + ".lora_B.weight"] @ p[pre + ".lora_A.weight"])
            h = _lstm_layer(h, w["ih"], w["hh"], p[f"rnn.bias_ih_l{k}"], p[f"rnn.bias_hh_l{k}"])
        if "proj.weight" in p:
            h = F.linear(h, p["proj.weight"], p["proj.bias"])
        weight = p["output.weight"] if "output.weight" in p else p["embedding.weight"]
        bias = p["output.bias"] if "output.bias" in p else p["output_bias"]
        feats = h.reshape(-1, h.shape[-1])[idx]
        nll = F.cross_entropy(F.linear(feats, weight, bias), y.reshape(-1)[idx], reduction="none")
        return (nll * wts).sum()

    @staticmethod
    def _stack(batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None], dev: torch.device
               ) -> tuple[torch.Tensor, ...]:
        """Pad the group's batches of one step to [G, B, T]; idx/wts [G, N]: valid positions, 1/count (0 = pad)."""
        real = [b for b in batches if b is not None]
        bmax = max(b[0].shape[0] for b in real)
        tmax = max(b[0].shape[1] for b in real)
        g = len(batches)
        x = torch.full((g, bmax, tmax), PAD_ID, dtype=torch.long)
        y = torch.full((g, bmax, tmax), PAD_ID, dtype=torch.long)
        pos: list[torch.Tensor] = []
        for i, b in enumerate(batches):
            if b is None:
                pos.append(torch.zeros(0, dtype=torch.long))
                continue
            inputs, targets, mask = b
            nb, nt = inputs.shape
            x[i, :nb, :nt], y[i, :nb, :nt] = inputs, targets
            full = torch.zeros(bmax, tmax, dtype=torch.bool)
            full[:nb, :nt] = mask
            pos.append(full.reshape(-1).nonzero().squeeze(1))
        n = max(1, max(int(p.numel()) for p in pos))
        idx = torch.zeros(g, n, dtype=torch.long)
        wts = torch.zeros(g, n, dtype=torch.float32)
        for i, p in enumerate(pos):
            idx[i, : p.numel()] = p
            if p.numel():
                wts[i, : p.numel()] = 1.0 / p.numel()
        return tuple(t.to(dev) for t in (x, y, idx, wts))

    def train_group(self, jobs: list[tuple[int, list[list[int]], bytes]]) -> list[DeviceResult]:
        """Train devices (user, sentences, device_key) together; results equal `DeviceTrainer.train`'s up to
        float rounding, in the order given."""
        t0 = time.perf_counter()
        tr = self.trainer
        spec, d = tr.spec, tr.spec.training
        dev = tr._start[0].device
        plans = []
        for _, sentences, key in jobs:
            rng, _, seqs, lengths = device_setup(sentences, key, spec.max_sentences, spec.max_tokens)
            plans.append((seqs.shape[0], lengths,
                          list(device_batches(seqs, lengths, rng, d.epochs, d.batch_size, tr.local_vocab))))
        g = len(jobs)
        names = set(self.names)
        frozen = {n: p.detach() for n, p in tr.model.named_parameters() if n not in names}
        start = dict(zip(self.names, tr._start))
        w = {n: start[n].unsqueeze(0).repeat(g, *([1] * start[n].dim())) for n in self.names}
        loss_sum = [0.0] * g
        tokens = [0] * g
        for s in range(max(len(p[2]) for p in plans)):
            step = [p[2][s] if s < len(p[2]) else None for p in plans]
            x, y, idx, wts = self._stack(step, dev)
            grads, losses = self._grad(w, frozen, x, y, idx, wts)
            with torch.no_grad():
                for n in self.names:
                    w[n].add_(grads[n], alpha=-d.lr)
            for i, b in enumerate(step):
                if b is not None:
                    ntok = int(b[2].sum())
                    loss_sum[i] += float(losses[i]) * ntok
                    tokens[i] += ntok
        seconds = (time.perf_counter() - t0) / g
        out = []
        with torch.no_grad():
            for i, (n_sent, lengths, batches) in enumerate(plans):
                update = torch.cat([(w[n][i] - start[n]).reshape(-1) for n in self.names]).float().cpu()
                num_tokens = int((lengths - 1).sum())
                out.append(DeviceResult(
                    update=update, weight=1.0 if spec.weighting == "uniform" else float(num_tokens),
                    num_tokens=num_tokens, num_sentences=n_sent, train_loss=loss_sum[i] / max(tokens[i], 1),
                    seconds=seconds, metrics={"local_steps": len(batches), "vectorized_group": g}))
        return out
