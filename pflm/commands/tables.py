"""The results table of a sweep or a set of runs (one row per run: ε, δ, perplexities, WER, wall time), as CSV
and Markdown, from summary.json and `pflm rescore` summaries only (released values)."""

from __future__ import annotations

import csv
import io
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pflm.commands.run_data import RunRecord

# (column, header in Markdown, format)
COLUMNS: list[tuple[str, str, str]] = [
    ("status", "status", "s"),
    ("epsilon", "ε", ".3f"),
    ("delta", "δ", ".0e"),
    ("noise_multiplier", "σ", ".4f"),
    ("simulated_users_epsilon", "ε of the simulated users", ".3g"),
    ("rounds", "rounds", "d"),
    ("val_perplexity", "val ppl", ".2f"),
    ("test_perplexity", "test ppl", ".2f"),
    ("test_word_perplexity", "test word ppl", ".2f"),
    ("first_pass_wer", "first-pass WER", ".2%"),
    ("rescored_wer", "rescored WER", ".2%"),
    ("wall_seconds", "wall s", ".0f"),
    ("run_dir", "run dir", "s"),
]


def run_row(run: "RunRecord | None", values: dict[str, Any], status: str = "", run_dir: str = "") -> dict[str, Any]:
    """One table row: the grid values of the point, then what its run released (empty for an unfinished run)."""
    row: dict[str, Any] = dict(values)
    row["status"] = status or ("done" if run is not None and run.summary else "not finished")
    row["run_dir"] = run_dir or (str(run.run_dir) if run is not None else "")
    if run is None or not run.summary:
        return row
    s = run.summary
    row["epsilon"] = s.get("epsilon") if run.private else math.inf
    row["delta"] = s.get("delta") if run.private else None  # a run without noise has no (ε, δ) guarantee
    for k in ("noise_multiplier", "rounds", "val_perplexity", "test_perplexity", "test_word_perplexity",
              "wall_seconds"):
        row[k] = s.get(k)
    if run.private and "simulated_users_epsilon" in s:
        se = s["simulated_users_epsilon"]
        row["simulated_users_epsilon"] = math.inf if se is None else se
    if run.rescore:
        row["first_pass_wer"] = run.rescore.get("first_pass_wer")
        row["rescored_wer"] = run.rescore.get("rescored_wer")
    if s.get("stop_reason"):
        row["status"] = "done (stopped early: budget)"
    if run.private and s.get("privacy_warning"):  # privacy.reproducible: the ε does not hold against seed holders
        row["status"] += " (REPRODUCIBLE mode: ε void against anyone who knows the seed)"
    return row


def _fmt(v: Any, spec: str) -> str:
    if v is None or v == "":
        return ""
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    if spec == "s" or isinstance(v, str) or isinstance(v, bool):
        return str(v)
    if spec == "d":
        return str(int(v))
    return format(v, spec)


def columns(rows: list[dict], grid_keys: list[str]) -> list[tuple[str, str, str]]:
    """Grid keys first, then the standard columns that at least one row has (empty WER columns are left out)."""
    used = {k for r in rows for k, v in r.items() if v not in (None, "")}
    return [(k, k, "s") for k in grid_keys] + [c for c in COLUMNS if c[0] in used]


def to_csv(rows: list[dict], grid_keys: list[str]) -> str:
    """Machine-readable: full precision, ε = inf for runs without noise."""
    cols = columns(rows, grid_keys)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([c[0] for c in cols])
    for r in rows:
        w.writerow(["inf" if isinstance(r.get(c[0]), float) and math.isinf(r[c[0]]) else
                    ("" if r.get(c[0]) is None else r.get(c[0])) for c in cols])
    return buf.getvalue()


def to_markdown(rows: list[dict], grid_keys: list[str]) -> str:
    cols = columns(rows, grid_keys)
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c[0]), c[2]).replace("|", "\\|") for c in cols) + " |")
    return "\n".join(lines) + "\n"
