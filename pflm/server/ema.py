"""Exponential moving average of the server model's iterates: a free post-processing of the DP releases.

Every iterate is a function of the noised aggregates the accountant already charges for, so their average is
covered by the same ε (De et al. 2022, "Unlocking high-accuracy differentially private image classification
through scale", §3: EMA of DP-SGD iterates). It never feeds back into training: devices always receive the
raw iterate, so the training trajectory and the releases are the same with or without it.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class IterateAverage:
    """Shadow copy of every floating-point tensor of the model's state, updated after each server step with
    decay d_t = min(decay, (1 + t) / (10 + t)) (t = steps so far; the warm-up keeps early averages from sitting
    on the initial weights, as TensorFlow's ExponentialMovingAverage with num_updates)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.steps = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.steps) / (10.0 + self.steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].mul_(d).add_(v.detach(), alpha=1.0 - d)
        self.steps += 1

    @torch.no_grad()
    def averaged_model(self, model: nn.Module) -> nn.Module:
        """A copy of `model` holding the averaged weights (non-float buffers from `model`)."""
        out = copy.deepcopy(model)
        state = out.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v)
        return out

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], steps: int) -> None:
        if set(tensors) != set(self.shadow):
            raise ValueError("checkpoint's EMA tensors do not match the model (was it written with another "
                             "server.ema_decay or model?)")
        for k, v in tensors.items():
            self.shadow[k].copy_(v)
        self.steps = steps
