"""One device's whole contribution to a round: local training, then the device-side privacy steps (clipping).

The in-process fan-out and the Flower ClientApp both call `device_update`, so a simulated device and a
deployed one compute the same vector. The privacy steps arrive as objects with an `on_device` method (the
device-side half of the run's postprocessor chain), so this stage needs no import from the privacy stage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from pflm.device.trainer import DeviceResult, DeviceTrainer
from pflm.round import RoundContext


class DeviceStep(Protocol):
    def on_device(self, update: torch.Tensor, ctx: RoundContext) -> tuple[torch.Tensor, dict[str, float]]: ...


def device_update(
    trainer: DeviceTrainer,
    steps: Sequence[DeviceStep],
    ctx: RoundContext,
    user: int,
    sentences: list[list[int]],
    device_key: bytes,
) -> tuple[DeviceResult, torch.Tensor, dict[str, float]]:
    """Train on `user`'s sentences (randomness from the secret `device_key`), apply the device-side steps;
    return (training result, the vector to upload, its side values to be summed)."""
    res = trainer.train(user, sentences, device_key)
    vec, aux = finish_update(trainer.spec.weighting, steps, ctx, res)
    return res, vec, aux


def finish_update(weighting: str, steps: Sequence[DeviceStep], ctx: RoundContext, res: DeviceResult
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """The device-side steps after training (also for devices trained as a group, pflm.device.vectorized)."""
    vec, aux = res.update, {}
    for step in steps:
        vec, a = step.on_device(vec, ctx)
        aux.update(a)
    if weighting == "tokens":
        vec = vec * res.weight
    return vec, aux
