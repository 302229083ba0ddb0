"""Draws run curves and privacy–utility plots as matplotlib Figures (Agg, no pyplot state) plus a JSON sidecar of
exactly what was plotted, so a reader or a test can check a PNG against the run's numbers."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pflm.io_utils import atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from pflm.commands.run_data import RunRecord

NOT_PRIVATE_TITLE = "NOT PRIVATE: exact values from the training users, not covered by ε — never publish"

# (panel title, y label, [(released key, legend suffix)], y log scale)
CURVE_PANELS: list[tuple[str, str, list[tuple[str, str]], bool]] = [
    ("validation perplexity", "perplexity", [("val_perplexity", "")], True),
    ("ε spent (accountant)", "ε", [("epsilon", "")], False),
    ("clipped fraction (noisy DP count; may leave [0, 1])", "fraction of updates clipped", [("noisy_clipped_fraction", "")], False),
    ("norm of the released update / of its noise", "L2 norm", [("update_norm", " update"), ("noise_norm_mean", " noise")], True),
    ("seconds per round", "s", [("seconds", "")], False),
    ("clip bound C", "C", [("clip_bound", "")], False),
]
MISSING_NOTE = {
    "epsilon": "no ε released (run without DP noise)",
    "noisy_clipped_fraction": "not released: needs privacy.adaptive_clipping\n(exact fraction only with --diagnostics, NOT PRIVATE)",
    "val_perplexity": "no validation rounds yet",
    "clip_bound": "fixed clip bound (not logged per round)",
}


@dataclass
class UtilityPoint:
    """One finished sweep point on the privacy–utility plot (epsilon None = no DP noise)."""

    group: str  # the values of the grid keys other than ε, '' when ε is the only key
    epsilon: float | None
    perplexity: float
    wer: float | None
    first_pass_wer: float | None = None  # of the N-best lists alone (no LM): the reference on the WER panel


def _figure(rows: int, cols: int, width: float, height: float) -> "Figure":
    # matplotlib is imported here, not at the top, so commands that never plot stay light. A bare Figure on an
    # Agg canvas: no pyplot, no global backend state, nothing to close.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _panel_data(ax: "Axes", lines: list[dict], hlines: list[dict] | None = None, note: str = "") -> dict:
    return {
        "title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
        "xscale": ax.get_xscale(), "yscale": ax.get_yscale(),
        "xlim": [float(v) for v in ax.get_xlim()], "ylim": [float(v) for v in ax.get_ylim()],
        "lines": lines, "hlines": hlines or [], "note": note,
    }


def _label(run: "RunRecord") -> str:
    eps = run.summary.get("epsilon")
    if not run.private:
        return f"{run.name} (no DP)"
    return f"{run.name} (ε={eps:.3g})" if isinstance(eps, (int, float)) else run.name


def _run_series(run: "RunRecord", key: str) -> list[tuple[int, float]]:
    if key == "noisy_clipped_fraction":  # what the server releases is the noisy *unclipped* fraction
        return [(r, 1.0 - v) for r, v in run.series("noisy_unclipped_fraction")]
    return run.series(key)


def _draw_panels(fig: "Figure", runs: list["RunRecord"], panels: list[tuple[str, str, list[tuple[str, str]], bool]],
                 source: dict[str, str], series_of: Any) -> list[dict]:
    cols = 3
    axes = fig.subplots(math.ceil(len(panels) / cols), cols, squeeze=False).ravel()
    out = []
    for ax, (title, ylabel, keys, logy) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylabel(ylabel)
        lines, missing = [], []
        for ri, run in enumerate(runs):
            for ki, (key, suffix) in enumerate(keys):
                pts = series_of(run, key)
                if not pts:
                    missing.append(key)
                    continue
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                label = _label(run) + suffix if len(runs) > 1 or suffix else None
                # one colour per run, one line style per key (update solid, its noise dashed)
                ax.plot(xs, ys, color=f"C{ri % 10}", linestyle=("-", "--", ":")[ki % 3],
                        marker="o" if len(xs) < 30 else None, markersize=3, label=label)
                lines.append({"run": str(run.run_dir), "key": key, "source": source.get(key, "metrics.jsonl"),
                              "label": label, "x": xs, "y": ys})
        note = ""
        if not lines:
            note = MISSING_NOTE.get(missing[0] if missing else "", "not in this run's files")
            ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=8, color="gray")
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ys = [y for ln in lines for y in ln["y"]]
            if logy and min(ys) > 0 and max(ys) / min(ys) > 20:  # log only where it helps: wide ranges
                ax.set_yscale("log")
            if any(ln["label"] for ln in lines):
                ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        out.append(_panel_data(ax, lines, note=note))
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    return out


def curves_figure(runs: list["RunRecord"]) -> tuple["Figure", dict]:
    """Per-round curves of one or more runs, from the RELEASED keys of metrics.jsonl only."""
    fig = _figure(2, 3, 15, 8)
    names = ", ".join(r.name for r in runs) if len(runs) <= 3 else f"{len(runs)} runs"
    fig.suptitle(f"{names}: released per-round metrics (metrics.jsonl)", fontsize=12)
    panels = _draw_panels(fig, runs, CURVE_PANELS, {"noisy_clipped_fraction": "metrics.jsonl:noisy_unclipped_fraction"},
                          _run_series)
    return fig, {"kind": "curves", "not_private": False, "title": fig.get_suptitle(), "panels": panels}


def not_private_figure(runs: list["RunRecord"]) -> tuple["Figure", dict] | None:
    """The exact, NOT-PRIVATE per-round values (diagnostics.jsonl, or a non-private run's unreleased keys), one
    panel per key, under a title that says so; None when no run has any."""
    keys = sorted({k for r in runs for k in r.not_private})
    if not keys:
        return None
    panels = [(f"NOT PRIVATE: {k}", k, [(k, "")], False) for k in keys]
    fig = _figure(math.ceil(len(keys) / 3), 3, 15, 4 * math.ceil(len(keys) / 3))
    fig.suptitle(NOT_PRIVATE_TITLE, fontsize=12, color="red", weight="bold")
    drawn = _draw_panels(fig, runs, panels, {k: "diagnostics.jsonl (NOT PRIVATE)" for k in keys},
                         lambda run, key: run.not_private.get(key, []))
    return fig, {"kind": "not_private", "not_private": True, "title": fig.get_suptitle(), "panels": drawn}


def privacy_utility_figure(points: list[UtilityPoint], title: str, epsilon_note: str = "") -> tuple["Figure", dict]:
    """Test word perplexity (and rescored WER when every point has one) against ε; runs without noise are drawn as
    horizontal lines (ε = ∞)."""
    with_wer = bool(points) and all(p.wer is not None for p in points)
    metrics = [("test word perplexity", "perplexity")] + ([("rescored WER", "wer")] if with_wer else [])
    fig = _figure(1, len(metrics), 6.5 * len(metrics), 4.8)
    fig.suptitle(title, fontsize=12)
    axes = fig.subplots(1, len(metrics), squeeze=False).ravel()
    groups = list(dict.fromkeys(p.group for p in points))
    panels = []
    for ax, (ylabel, attr) in zip(axes, metrics):
        lines, hlines = [], []
        for gi, g in enumerate(groups):
            color = f"C{gi % 10}"
            hcolor = "k" if len(groups) == 1 else color
            dp = sorted((p for p in points if p.group == g and p.epsilon is not None), key=lambda p: p.epsilon)
            if dp:
                xs, ys = [p.epsilon for p in dp], [getattr(p, attr) for p in dp]
                label = f"DP {g}".strip()
                ax.plot(xs, ys, marker="o", color=color, label=label)
                lines.append({"label": label, "x": xs, "y": ys})
            for p in points:
                if p.group == g and p.epsilon is None:
                    y = getattr(p, attr)
                    label = f"no DP (ε = ∞) {g}".strip()
                    ax.axhline(y, linestyle="--", color=hcolor, label=label)
                    hlines.append({"label": label, "y": y})
        first = {p.first_pass_wer for p in points}
        if attr == "wer" and len(first) == 1 and None not in first:
            (fp,) = first
            ax.axhline(fp, linestyle=":", color="gray", label="first pass (no LM rescoring)")
            hlines.append({"label": "first pass (no LM rescoring)", "y": fp})
        if attr == "wer":
            from matplotlib.ticker import PercentFormatter

            ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
        if lines and all(x > 0 for ln in lines for x in ln["x"]):
            ax.set_xscale("log")
            ticks = sorted({x for ln in lines for x in ln["x"]})
            ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel("ε" + (f" ({epsilon_note})" if epsilon_note else ""))
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} vs ε", fontsize=10)
        ax.grid(alpha=0.3)
        if lines or hlines:
            ax.legend(fontsize=8)
        panels.append(_panel_data(ax, lines, hlines))
    return fig, {"kind": "privacy_utility", "not_private": False, "title": title, "panels": panels}


def save_figure(fig: "Figure", data: dict, png: Path) -> Path:
    """Write the PNG and its JSON sidecar (same name, .json) atomically; returns the PNG path."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(png, buf.getvalue())
    atomic_write_json(png.with_suffix(".json"), {**data, "png": png.name})
    return png


def load_sidecar(png: Path) -> dict:
    return json.loads(Path(png).with_suffix(".json").read_text())
