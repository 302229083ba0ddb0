"""The release ledger: which aggregate each round released, so a redone round is charged again only if it differs.

A run that crashes after round r but resumes from an earlier checkpoint redoes the rounds in between. Those
rounds were already released (metrics.jsonl, the evaluation of the intermediate model). If the redo is
bit-identical (same run key → same cohort, same device keys, same noise), nothing new is revealed and the
round costs nothing extra; if it differs (lost key, device-local randomness on a real deployment), the two
releases compose and the accountant must be charged for both. The ledger stores a SHA-256 of each round's
released (noised) aggregate, appended and fsync'ed *before* the release leaves the server.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from pflm.round import AggregateResult
from pflm.errors import PflmError
from pflm.io_utils import atomic_write_text

LEDGER_FILE = "releases.jsonl"


def release_digest(agg: AggregateResult, clip_bound: float) -> str:
    """SHA-256 of what the server releases in one round: the noised sum and the noised side values."""
    h = hashlib.sha256()
    h.update(agg.total.detach().to(torch.float32).contiguous().numpy().tobytes())
    h.update(json.dumps({"aux": {k: float(v) for k, v in sorted(agg.aux.items())}, "clip": float(clip_bound)},
                        sort_keys=True).encode())
    return h.hexdigest()


class ReleaseLedger:
    """Append-only record of (round, digest) for every release this run directory has ever made."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LEDGER_FILE
        self._seen: dict[int, set[str]] = {}
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
                self._seen.setdefault(int(rec["round"]), set()).add(str(rec["sha256"]))
            except (ValueError, KeyError, TypeError):
                if n < len(lines):  # a torn last line is a crash mid-write (that release never left); else damage
                    raise PflmError(f"{self.path} line {n} is corrupt; restore it or delete the run directory") from None
                atomic_write_text(self.path, "".join(ln + "\n" for ln in lines[:-1]))

    def releases_of(self, round_idx: int) -> int:
        """How many distinct releases of this round have already left the server."""
        return len(self._seen.get(round_idx, ()))

    def record(self, round_idx: int, digest: str) -> int:
        """Record a release (durably, before it is published); return how many releases of this round the
        accountant must charge, which restarts from a checkpoint taken before the round: all distinct releases
        of it ever made (1 for a first release or a bit-identical redo, 2 for a redo that differs, …)."""
        seen = self._seen.setdefault(round_idx, set())
        if digest in seen:
            return len(seen)
        seen.add(digest)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"round": round_idx, "sha256": digest}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return len(seen)
