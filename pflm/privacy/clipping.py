"""Device-side L2 clipping of the whole update: bounds each user's contribution to the sum (the DP sensitivity)."""

from __future__ import annotations

import math

import torch

from pflm.aggregator.base import RoundContext
from pflm.errors import ConfigError, PflmError
from pflm.privacy.base import Postprocessor


class NonFiniteUpdate(PflmError):
    """A device update contains NaN or Inf; the caller drops it (and counts it) instead of averaging it in."""


def l2_norm(update: torch.Tensor) -> float:
    """L2 norm accumulated in float64 (float32 sums of millions of squares lose precision or overflow)."""
    return float(torch.linalg.vector_norm(update.detach().reshape(-1), dtype=torch.float64))  # no float64 copy


def clip_l2(update: torch.Tensor, clip_bound: float) -> tuple[torch.Tensor, float, bool]:
    """Return (update scaled to L2 norm ≤ clip_bound, its original norm, whether it was scaled).

    Updates already within the bound are returned unchanged (same tensor). The scaled result is checked
    in float64 after the cast back to the update's dtype and nudged down if rounding pushed it above C,
    so the bound holds exactly for the values that are sent.
    """
    if not clip_bound > 0:
        raise ConfigError(f"clip bound C={clip_bound} is invalid: use C > 0 (or inf to disable clipping)")
    # Fast float32 norm first (pairwise summation, ~1e-6 relative error); NaN/Inf anywhere makes it non-finite.
    norm = float(torch.linalg.vector_norm(update.detach().reshape(-1)))
    if norm <= clip_bound * (1 - 1e-5):
        return update, norm, False
    if math.isfinite(norm) or not bool(torch.isnan(update).any() | torch.isinf(update).any()):
        norm = l2_norm(update)  # close to the bound or float32 overflow: decide in float64
    if not math.isfinite(norm):
        bad = int((~torch.isfinite(update)).sum())
        raise NonFiniteUpdate(f"update has {bad} NaN/Inf value(s): drop this device's update")
    if norm <= clip_bound:
        return update, norm, False
    scale = clip_bound / norm
    clipped = update * scale
    for _ in range(8):
        if l2_norm(clipped) <= clip_bound:
            break
        scale *= 1.0 - 4.0 * torch.finfo(update.dtype).eps
        clipped = update * scale
    return clipped, norm, True


class L2Clip(Postprocessor):
    """Clip each device's flat update to ‖Δ‖₂ ≤ ctx.clip_bound; aux {"clipped": 0/1} (fraction = sum/count).

    Raises `NonFiniteUpdate` for NaN/Inf updates. The "clipped" sum is a diagnostic the server sees without
    noise: it is not covered by the DP guarantee (adaptive clipping releases a noised count instead).
    """

    def on_device(self, update: torch.Tensor, ctx: RoundContext) -> tuple[torch.Tensor, dict[str, float]]:
        if math.isinf(ctx.clip_bound):
            if not bool(torch.isfinite(update).all()):
                raise NonFiniteUpdate("update has NaN/Inf values: drop this device's update")
            return update, {"clipped": 0.0}
        clipped, _, was_clipped = clip_l2(update, ctx.clip_bound)
        return clipped, {"clipped": 1.0 if was_clipped else 0.0}
