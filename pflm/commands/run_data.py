"""Reads what plots and tables may show from run and sweep directories: released metrics by default, NOT-PRIVATE
diagnostics only on request, each value tagged with the file it came from."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from pflm.driver.metrics import DIAGNOSTICS_FILE, RELEASED
from pflm.errors import DataError

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
RESCORE_SUMMARY = Path("rescore") / "summary.json"
SWEEP_FILE = "sweep.json"


@dataclass
class RunRecord:
    """One run directory: its summary, the released per-round series and (opt-in) the NOT-PRIVATE ones."""

    run_dir: Path
    name: str
    summary: dict
    released: dict[str, list[tuple[int, float]]]  # key -> [(round, value)], RELEASED keys of metrics.jsonl only
    not_private: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # only when asked for
    rescore: dict | None = None  # `pflm rescore` summary (WER) when the run has one

    @property
    def private(self) -> bool:
        return self.summary.get("epsilon") is not None or bool(self.summary.get("noise_multiplier"))

    def series(self, key: str) -> list[tuple[int, float]]:
        return self.released.get(key, [])


def _numeric(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _read_rows(path: Path) -> list[dict]:
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{i} is not a JSON line; the file is damaged (rerun `pflm train` to redo it)") from None
        if isinstance(row, dict) and "round" in row:
            rows.append(row)
    return rows


def _collect(rows: list[dict], keep: "set[str] | frozenset[str] | None", drop: frozenset[str]) -> dict[str, list]:
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        r = int(row["round"])
        for k, v in row.items():
            if k == "round" or k in drop or (keep is not None and k not in keep) or not _numeric(v):
                continue
            out.setdefault(k, []).append((r, float(v)))
    return out


def load_run(run_dir: str | Path, diagnostics: bool = False) -> RunRecord:
    """A finished (or running) `pflm train` directory. Only RELEASED keys of metrics.jsonl are read unless
    `diagnostics`: then diagnostics.jsonl and, for a non-private run, metrics.jsonl's other keys fill
    `not_private` (exact values computed from the training users, never covered by ε)."""
    run_dir = Path(run_dir)
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise DataError(f"{run_dir} has no {METRICS_FILE}; pass a `pflm train` run directory (or a `pflm sweep` --out dir)")
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    rows = _read_rows(metrics)
    released = _collect(rows, RELEASED, frozenset())
    not_private: dict[str, list[tuple[int, float]]] = {}
    if diagnostics:
        not_private = _collect(rows, None, RELEASED)  # a non-private run's metrics.jsonl keeps the exact values
        diag = run_dir / DIAGNOSTICS_FILE
        if diag.is_file():
            for k, v in _collect(_read_rows(diag), None, frozenset()).items():
                not_private.setdefault(k, []).extend(v)
    rescore_path = run_dir / RESCORE_SUMMARY
    rescore = json.loads(rescore_path.read_text()) if rescore_path.is_file() else None
    return RunRecord(run_dir, summary.get("name") or run_dir.name, summary, released, not_private, rescore)


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / SWEEP_FILE).is_file()


def load_sweep(sweep_dir: str | Path) -> tuple[dict, list[tuple[dict, RunRecord]]]:
    """(sweep.json, [(point, RunRecord)] for its points that have finished, in grid order)."""
    sweep_dir = Path(sweep_dir)
    spec = json.loads((sweep_dir / SWEEP_FILE).read_text())
    done = []
    for point in spec["points"]:
        run_dir = sweep_dir / point["run_dir"]
        if (run_dir / SUMMARY_FILE).is_file():
            done.append((point, load_run(run_dir)))
    return spec, done
