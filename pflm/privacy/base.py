"""The postprocessor interface every DP / compression step plugs into (device side and server side).

A postprocessor sees each device's update vector before aggregation (`on_device`, runs on the device)
and the aggregate after it (`on_server`). Clipping, Gaussian noise and adaptive clipping are postprocessors;
the simulator and the Flower adapters call the same chain.
"""

from __future__ import annotations

from abc import ABC
from typing import Any

import torch

from pflm.round import AggregateResult, RoundContext


class Postprocessor(ABC):
    def on_device(self, update: torch.Tensor, ctx: RoundContext) -> tuple[torch.Tensor, dict[str, float]]:
        """Transform one device's update; return it and scalar side values to be *summed* by the aggregator."""
        return update, {}

    def on_server(self, agg: AggregateResult, ctx: RoundContext) -> tuple[AggregateResult, dict[str, float]]:
        """Transform the aggregate; return it and metrics for the round."""
        return agg, {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
