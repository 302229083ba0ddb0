"""Optional TensorBoard sink (`logging.tensorboard: true`): the same released scalars as metrics.jsonl, nothing else."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pflm.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"


def released_scalars(released: dict, allowed: frozenset[str]) -> dict[str, float]:
    """The finite numeric values among `released` whose keys are in `allowed` (the RELEASED whitelist)."""
    out = {}
    for k, v in released.items():
        if k == "round" or k not in allowed or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            out[k] = float(v)
    return out


class TensorBoardLog:
    """Writes each round's released scalars with `torch.utils.tensorboard`. The event file is opened at the first
    round written with `purge_step` = that round, so rounds a resumed run redoes replace their earlier events."""

    def __init__(self, run_dir: Path, allowed: frozenset[str]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises ImportError when the `tensorboard` package is missing
            raise ConfigError(
                "logging.tensorboard=true needs the tensorboard package: pip install tensorboard==2.21.0 "
                "(or set logging.tensorboard=false)"
            ) from None
        self._writer_cls = SummaryWriter
        self.log_dir = Path(run_dir) / TENSORBOARD_DIR
        self.allowed = allowed
        self._writer: Any = None

    def write(self, released: dict) -> None:
        step = int(released["round"])
        if self._writer is None:
            self._writer = self._writer_cls(log_dir=str(self.log_dir), purge_step=step)
        for k, v in released_scalars(released, self.allowed).items():
            self._writer.add_scalar(f"released/{k}", v, global_step=step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
