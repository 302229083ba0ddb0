"""The release ledger: which aggregate each round released, so a redone round is charged again only if it differs.

A run that crashes after round r but resumes from an earlier checkpoint redoes the rounds in between. Those
rounds were already released (metrics.jsonl, the evaluation of the intermediate model). If the redo is
bit-identical (same run key → same cohort, same device keys, same noise), nothing new is revealed and the
round costs nothing extra; if it differs (lost key, device-local randomness on a real deployment), the two
releases compose and the accountant must be charged for both — and the redo's noise must be *fresh*: two
releases of one round with the same noise would reveal the exact difference of the two sums. So the ledger also
keeps a keyed digest (HMAC under a subkey of the secret run key) of each round's exact aggregate *before* noise:
a redo whose aggregate matches an earlier attempt reuses that attempt's noise stream (identical release, charged
once); a new aggregate gets the next attempt number and with it a fresh stream (`RoundContext.release_attempt`).
Each line holds the round, the SHA-256 of the released (noised) aggregate, the attempt and the keyed pre-noise
digest, appended and fsync'ed *before* the release leaves the server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path

import torch

from pflm.round import AggregateResult
from pflm.errors import PflmError
from pflm.io_utils import atomic_write_text

LEDGER_FILE = "releases.jsonl"


def release_digest(agg: AggregateResult, clip_bound: float, key: bytes | None = None) -> str:
    """SHA-256 of what the server releases in one round (the noised sum and side values); with `key`, the HMAC of
    the same bytes (for exact, pre-noise aggregates: useless to anyone without the run key)."""
    h = hashlib.sha256() if key is None else hmac.new(key, digestmod=hashlib.sha256)
    h.update(agg.total.detach().to(torch.float32).contiguous().numpy().tobytes())
    h.update(json.dumps({"aux": {k: float(v) for k, v in sorted(agg.aux.items())}, "clip": float(clip_bound)},
                        sort_keys=True).encode())
    return h.hexdigest()


class ReleaseLedger:
    """Append-only record of (round, digest) for every release this run directory has ever made."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LEDGER_FILE
        self._seen: dict[int, set[str]] = {}
        self._attempts: dict[int, dict[str, int]] = {}  # round → keyed pre-noise digest → attempt number
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        for n, line in enumerate(lines, 1):
            try:
                rec = json.loads(line)
                self._seen.setdefault(int(rec["round"]), set()).add(str(rec["sha256"]))
                if rec.get("pre"):
                    self._attempts.setdefault(int(rec["round"]), {})[str(rec["pre"])] = int(rec["attempt"])
            except (ValueError, KeyError, TypeError):
                if n < len(lines):  # a torn last line is a crash mid-write (that release never left); else damage
                    raise PflmError(f"{self.path} line {n} is corrupt; restore it or delete the run directory") from None
                atomic_write_text(self.path, "".join(ln + "\n" for ln in lines[:-1]))

    def releases_of(self, round_idx: int) -> int:
        """How many distinct releases of this round have already left the server."""
        return len(self._seen.get(round_idx, ()))

    def attempt(self, round_idx: int, pre_digest: str) -> int:
        """The noise attempt for this round's exact aggregate: an earlier attempt's number if the same aggregate was
        released before (the redo is then identical), else one past every release of the round made so far."""
        # every distinct release so far used a distinct attempt < their count, so the count is a fresh attempt
        return self._attempts.get(round_idx, {}).get(pre_digest, len(self._seen.get(round_idx, ())))

    def record(self, round_idx: int, digest: str, pre_digest: str = "", attempt: int = 0) -> int:
        """Record a release (durably, before it is published); return how many releases of this round the
        accountant must charge, which restarts from a checkpoint taken before the round: all distinct releases
        of it ever made (1 for a first release or a bit-identical redo, 2 for a redo that differs, …)."""
        seen = self._seen.setdefault(round_idx, set())
        if digest in seen:
            return len(seen)
        seen.add(digest)
        if pre_digest:
            self._attempts.setdefault(round_idx, {})[pre_digest] = attempt
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rec = {"round": round_idx, "sha256": digest, **({"attempt": attempt, "pre": pre_digest} if pre_digest else {})}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return len(seen)
