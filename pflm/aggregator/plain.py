"""Plain (non-cryptographic) summation, the fast default when the server is trusted to see only sums in code."""

from __future__ import annotations

import torch

from pflm.aggregator.base import Aggregator
from pflm.round import AggregateResult, RoundContext, Upload
from pflm.errors import AggregationFailed, NoContributions


class PlainSumAggregator(Aggregator):
    name = "plain"

    def __init__(self) -> None:
        self._ctx: RoundContext | None = None
        self._total: torch.Tensor | None = None

    def begin(self, ctx: RoundContext) -> None:
        self._ctx = ctx
        self._total = torch.zeros(ctx.dim, dtype=torch.float32)
        self._weight = 0.0
        self._count = 0
        self._aux: dict[str, float] = {}
        self._seen: set[int] = set()
        self._rejected = 0

    def upload(self, device_id: int, update: torch.Tensor, weight: float, aux: dict[str, float] | None = None) -> Upload:
        assert self._ctx is not None, "begin() not called"
        if update.numel() != self._ctx.dim:
            raise AggregationFailed(
                f"device {device_id} sent an update of length {update.numel()}, expected {self._ctx.dim}"
            )
        return Upload(int(device_id), (update.reshape(-1), float(weight), dict(aux or {})))

    def receive(self, upload: Upload) -> None:
        assert self._ctx is not None and self._total is not None, "begin() not called"
        device_id = upload.device_id
        if device_id in self._seen:
            raise AggregationFailed(f"device {device_id} sent two updates in round {self._ctx.round}")
        self._seen.add(device_id)
        update, weight, aux = upload.payload
        if not self._acceptable(update, weight):  # a faulty or malicious device: reject it, keep the round
            self._rejected += 1
            return
        self._total.add_(update)
        self._weight += weight
        self._count += 1
        for k, v in aux.items():
            self._aux[k] = self._aux.get(k, 0.0) + float(v)

    def _acceptable(self, update: torch.Tensor, weight: float) -> bool:
        """What the server can check of a plaintext update: its length, finiteness and clipped norm (≤ C·weight)."""
        assert self._ctx is not None
        if update.numel() != self._ctx.dim or not torch.isfinite(update).all():
            return False
        bound = float(self._ctx.clip_bound) * max(float(weight), 0.0)
        return bound == float("inf") or float(update.double().norm()) <= bound * (1 + 1e-6)

    def finalize(self) -> AggregateResult:
        assert self._total is not None
        if self._count == 0:
            raise NoContributions("no device contributed an update this round")
        metrics = {"rejected_uploads": float(self._rejected)} if self._rejected else {}
        return AggregateResult(self._total, self._weight, self._count, dict(self._aux), metrics)
