"""The vocabulary of one round, shared by every stage: what the server plans, what devices upload, what it learns.

Neutral ground below device, aggregator, privacy, server and the backends, so none of them has to import
another to speak about a round. Data flow: the server builds a `RoundPlan` (with its `RoundContext`) → each
device turns its clipped update into an `Upload` → the aggregator reveals an `AggregateResult` (a sum).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # the spec's type lives with the device stage; a plan only carries it
    from pflm.device.spec import DeviceSpec


@dataclass
class RoundContext:
    """What every participant of one round may know (all of it public to the cohort)."""

    round: int  # 0-based round index
    dim: int  # length of the release vector
    cohort: list[int]  # device (user) ids of this message: the whole cohort only inside the server
    clip_bound: float  # L2 bound C on each device's update (owned by privacy: `DPMechanism.clip_bound_for`)
    seed: int  # run seed (for simulation determinism; never a secret)
    extra: dict = field(default_factory=dict)
    # 0 for a round's first release; k for the k-th *different* aggregate of a round redone after a resume: its noise
    # must come from a fresh stream, or two releases with the same noise would reveal the exact difference of sums
    release_attempt: int = 0

    def stream(self, purpose: str) -> str:
        """The noise stream name of `purpose` for this release attempt (unchanged for the first release)."""
        return purpose if self.release_attempt == 0 else f"{purpose}/redo{self.release_attempt}"


@dataclass
class RoundPlan:
    """What the server broadcasts to the round's cohort (all public to it)."""

    round: int
    cohort: list[int]  # user indices into the training population (secret: never sent whole to a node)
    rows: torch.Tensor | None  # selected global vocabulary rows (None = all)
    device_state: dict[str, torch.Tensor]  # the device model's weights for this round
    ctx: RoundContext
    spec: DeviceSpec  # how devices train and clip (the device half of the recipe; devices never see the recipe)


@dataclass
class AggregateResult:
    """What the server learns at the end of a round."""

    total: torch.Tensor  # sum of the (clipped, weighted) update vectors, float32 [dim]
    weight_sum: float  # sum of device weights
    num_contributors: int  # devices whose update is in `total`
    aux: dict[str, float] = field(default_factory=dict)  # sums of per-device scalars (e.g. clipped indicators)
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Upload:
    """What one device sends the aggregator: its payload (plain: the update; secure: a masked vector), or
    `excluded` naming why it sends nothing usable (the server then counts it as excluded)."""

    device_id: int
    payload: Any = None
    excluded: str | None = None
    diagnostic: Any = None  # simulation-only side data (never part of what a real device sends)
