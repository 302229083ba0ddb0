"""What a round may publish: metrics.jsonl holds only DP-released or public values; the rest is opt-in diagnostics.

Every value below in `RELEASED` is either public (the recipe's configuration, the round index, the server lr schedule, timings — we do
not defend against timing side channels) or a post-processing of the round's noised release (noise stds
derive from public settings; update_norm from the noised average; epsilon from the accountant; the adaptive
clip bound from the noised count; validation perplexity of the released model, or of the last iterate, on
held-out users). Anything else a round computes — exact train loss, exact clip counts, the realised cohort size (private under Poisson
sampling), NaN drops, per-device ε, SecAgg survivor counts — is computed from training users without noise and
goes only to `diagnostics.jsonl` when the recipe sets `diagnostics: true`, under a first line that says so. A
run without noise (ε = ∞) is not private at all, so its metrics.jsonl keeps everything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any

RELEASED = frozenset({
    "round", "epsilon", "noise_std_sum", "noise_std_mean", "noise_norm_mean", "update_norm",
    "clip_bound", "next_clip_bound", "noisy_unclipped_fraction", "count_noise_std",
    "val_perplexity", "val_word_perplexity", "last_iterate_val_word_perplexity", "seconds", "failed",
    "releases_of_round", "recipe_changes", "server_lr",
})
# SecAgg's encoding step and protocol messages are functions of the realised cohort size (private under Poisson
# sampling): the released "failed" value is this fixed text, the exact reason goes to the diagnostics.
FAILED_PUBLIC = "aggregation failed safely: nothing was released this round"
DIAGNOSTICS_FILE = "diagnostics.jsonl"
DIAGNOSTICS_HEADER = ("# NOT PRIVATE: exact per-round values computed from the training users' data without DP "
                      "noise; they are NOT covered by the run's epsilon. Never publish this file.\n")


def split_metrics(m: dict, private: bool) -> tuple[dict, dict]:
    """(released, diagnostics-only) parts of one round's metrics."""
    if not private:
        return dict(m), {}
    released = {k: v for k, v in m.items() if k in RELEASED}
    rest = {k: v for k, v in m.items() if k not in RELEASED}
    if "failed" in m:
        released["failed"], rest["failed_reason"] = FAILED_PUBLIC, m["failed"]
    if rest:
        rest = {"round": m["round"], **rest}
    return released, rest


class RoundLog:
    """Appends each round's released metrics to metrics.jsonl and, if enabled, the rest to diagnostics.jsonl."""

    def __init__(self, run_dir: Path, private: bool, diagnostics: bool, tensorboard: Any = None) -> None:
        self.private = private
        self.tensorboard = tensorboard  # a driver.tensorboard.TensorBoardLog: gets the released part only
        self.metrics_path = run_dir / "metrics.jsonl"
        self.diag_path = run_dir / DIAGNOSTICS_FILE if diagnostics and private else None
        self._files: list[IO[str]] = []

    def __enter__(self) -> "RoundLog":
        self._mf = open(self.metrics_path, "a", encoding="utf-8")
        self._files.append(self._mf)
        self._df = None
        if self.diag_path is not None:
            fresh = not self.diag_path.exists() or self.diag_path.stat().st_size == 0
            self._df = open(self.diag_path, "a", encoding="utf-8")
            self._files.append(self._df)
            if fresh:
                self._df.write(DIAGNOSTICS_HEADER)
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self._files:
            f.close()
        if self.tensorboard is not None:
            self.tensorboard.close()

    def write(self, m: dict) -> dict:
        """Write one round; return the released part (what the console may show)."""
        released, rest = split_metrics(m, self.private)
        self._mf.write(json.dumps(released) + "\n")
        self._mf.flush()
        if self.tensorboard is not None:
            self.tensorboard.write(released)
        if self._df is not None and rest:
            self._df.write(json.dumps(rest) + "\n")
            self._df.flush()
        return released
