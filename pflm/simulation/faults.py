"""Simulated device faults for the in-process backend: crashes, stragglers and corrupt uploads, drawn per round.

Real fleets lose devices mid-round. A recipe's `faults` section makes the simulator do the same: the draws come
from the run key (a resumed round redraws the same faults), faulty devices are dropped or their uploads rejected by
the server, and the counts go to the round's diagnostics. The noise std follows the expected cohort, so a dropped
device never makes the noise smaller than the accountant assumes.
"""

from __future__ import annotations

import torch

from pflm.config import FaultsConfig
from pflm.errors import ConfigError
from pflm.round import Upload
from pflm.secure_random import SecureRandom, subkey

DROPPED_UNTRAINED = frozenset({"device_crash", "straggler"})  # nothing of theirs reaches the aggregator
CORRUPTIONS = ("corrupt_nan", "corrupt_length", "corrupt_norm")


class FaultPlan:
    """Which devices of a round fail, and how: a pure function of (run key, round, cohort)."""

    def __init__(self, cfg: FaultsConfig, run_key: bytes, aggregation: str) -> None:
        if cfg.corrupt_update and aggregation != "plain":
            raise ConfigError("faults.corrupt_update is simulated with aggregation=plain only (a secure aggregator "
                              "cannot inspect uploads); set faults.corrupt_update=0 or aggregation=plain")
        self.cfg = cfg
        self.rng = SecureRandom(subkey(run_key, "simulated-faults"))

    def plan(self, round_idx: int, cohort: list[int]) -> dict[int, str]:
        c = self.cfg
        if not (c.device_crash or c.straggler or c.corrupt_update) or not cohort:
            return {}
        u = self.rng.uniform(round_idx, len(cohort), "faults").tolist()
        out: dict[int, str] = {}
        for i, (user, x) in enumerate(zip(cohort, u)):
            if x < c.device_crash:
                out[user] = "device_crash"
            elif x < c.device_crash + c.straggler:
                out[user] = "straggler"
            elif x < c.device_crash + c.straggler + c.corrupt_update:
                out[user] = CORRUPTIONS[i % len(CORRUPTIONS)]
        return out

    @staticmethod
    def counts(faults: dict[int, str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for kind in faults.values():
            key = "faults_" + ("corrupt_update" if kind in CORRUPTIONS else kind)
            out[key] = out.get(key, 0) + 1
        return out


def corrupt_upload(upload: Upload, kind: str, dim: int) -> Upload:
    """The upload a faulty device would send instead of its honest one (plain aggregation payloads)."""
    update, weight, aux = upload.payload
    if kind == "corrupt_nan":
        bad = update.clone()
        bad[0] = float("nan")
    elif kind == "corrupt_length":
        bad = torch.zeros(dim + 1, dtype=update.dtype)
    else:  # corrupt_norm: far above the clip bound
        bad = torch.full_like(update, 1e3)
    return Upload(upload.device_id, (bad, weight, aux))
