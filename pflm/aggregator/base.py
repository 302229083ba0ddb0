"""The aggregator interface: the server learns only the sum of the cohort's clipped update vectors.

Every update is a flat float32 vector in the round's *release space* (the parameters the devices send:
all weights, or only LoRA adapters and the round's selected embedding rows). Each device turns its update into
an `Upload` (`upload`: device side, thread-safe, so several simulated devices may run it at once); the server
`receive`s uploads one by one and `finalize` returns the sum. `add` = receive(upload(...)). A secure aggregator
replaces the plain sum without any change to device or server code.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from pflm.round import AggregateResult, RoundContext, Upload  # noqa: F401 - the interface's types


class Aggregator(ABC):
    """Streams device updates in; reveals only their sum.

    Life cycle per round: `begin(ctx)` → `upload(...)` on each device that finished, `receive(upload)` on the
    server, in any order of devices (or `add(...)` for both) → `finalize()`. `finalize` raises
    `pflm.errors.AggregationFailed` when the round cannot be completed safely (e.g. too few survivors); the
    caller then leaves the model and the privacy accountant untouched.
    """

    name: str = "base"
    concurrent_uploads: int = 1  # how many devices the caller runs `upload` for at once (splits the CPU threads)

    @abstractmethod
    def begin(self, ctx: RoundContext) -> None: ...

    @abstractmethod
    def upload(self, device_id: int, update: torch.Tensor, weight: float, aux: dict[str, float] | None = None) -> Upload:
        """Device side: turn one device's clipped update (float32 [ctx.dim]) with its weight and scalar side
        values into what it sends. Must be safe to call for different devices from several threads."""

    @abstractmethod
    def receive(self, upload: Upload) -> None:
        """Server side: take one device's upload into the round's sum (one thread)."""

    def add(self, device_id: int, update: torch.Tensor, weight: float, aux: dict[str, float] | None = None) -> None:
        """Device and server side at once (the sequential path)."""
        self.receive(self.upload(device_id, update, weight, aux))

    def drop(self, device_id: int) -> None:
        """The device will not contribute this round (failed, NaN update, dropped out)."""

    @abstractmethod
    def finalize(self) -> AggregateResult: ...
