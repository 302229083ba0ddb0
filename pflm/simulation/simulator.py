"""The in-process backend: `Simulator(cfg)` is the run driver with every simulated device trained in this process."""

from __future__ import annotations

from pflm.config import RecipeConfig
from pflm.driver.run import RunDriver
from pflm.simulation.local import LocalDevices


def Simulator(cfg: RecipeConfig) -> RunDriver:  # noqa: N802 - reads as the class it used to be
    """The recipe's run driver with the local fan-out (`sim.fanout.trainer` is its first device trainer)."""
    return RunDriver(cfg, LocalDevices())
