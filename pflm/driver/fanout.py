"""The seam between the round loop and the devices: a `DeviceFanout` gets a round's cohort trained and uploaded.

The driver plans the round and closes it (finalize → noise → server step → accountant → metrics); the fan-out
only moves the plan to the devices and their uploads into the aggregator. Two implementations: `LocalDevices`
(threads in this process, `pflm.simulation.local`) and `FlowerNodes` (Flower Message API,
`pflm.flower.nodes`). Like Flower's strategy phases, one method per phase: `attach` once, `train_round` per round.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pflm.aggregator.base import Aggregator
from pflm.config import RecipeConfig
from pflm.round import RoundPlan
from pflm.runtime import thread_plan

if TYPE_CHECKING:
    from pflm.driver.run import RunDriver


@dataclass
class RoundTally:
    """What a fan-out reports about a round's devices. Exact values computed from users' data: the driver puts
    them in metrics only for non-private runs, else in the opt-in diagnostics file (`pflm.driver.metrics`)."""

    metrics: dict = field(default_factory=dict)  # cohort size, NaN drops, node failures, per-device DP-SGD ε, …
    loss_sum: float = 0.0  # Σ over devices of train loss × tokens
    tokens: int = 0


class DeviceFanout(ABC):
    """How a round's cohort is trained: in this process or on remote nodes."""

    def thread_split(self, cfg: RecipeConfig) -> tuple[int, int, int]:
        """(devices trained at once in this process, torch threads each, all threads) for the recipe."""
        return thread_plan(cfg)

    @abstractmethod
    def attach(self, driver: RunDriver) -> None:
        """Called once the driver has opened the data and built server and aggregator."""

    @abstractmethod
    def train_round(self, plan: RoundPlan, aggregator: Aggregator) -> RoundTally:
        """Have every user of `plan.cohort` train and `receive` its upload into the aggregator, or `drop` it."""

    def close(self) -> None:
        """Release threads or connections (the driver calls it when the run ends)."""
