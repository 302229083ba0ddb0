"""Validation-perplexity curves and a table for DP-FTRL vs DP-FedAvg-without-amplification runs (docs/dpftrl.md).

Usage: python scripts/dpftrl_compare.py --runs LABEL=RUN_DIR ... --out docs/dpftrl_curve.png
Several runs may share a LABEL (an arm run with fresh secret noise each time): each run is drawn thin, the arm's
mean thick, and the table adds one mean row per arm (± half the range). Reads each run's metrics.jsonl (released
values only) and summary.json; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _load(run: str) -> tuple[list[tuple[int, float]], dict, float]:
    rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    pts = [(r["round"] + 1, r["val_perplexity"]) for r in rows if "val_perplexity" in r]
    secs = sum(r.get("seconds", 0.0) for r in rows) / max(len(rows), 1)
    return pts, json.loads((Path(run) / "summary.json").read_text()), secs


def _spread(xs: list[float]) -> str:
    mean = sum(xs) / len(xs)
    return f"**{mean:.1f}** ± {(max(xs) - min(xs)) / 2:.1f}" if len(xs) > 1 else f"{mean:.1f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="LABEL=RUN_DIR (repeat a LABEL for several runs of an arm)")
    ap.add_argument("--out", required=True, help="PNG path for the curves")
    ap.add_argument("--title", default="chitchat, ε = 2 (δ = 1e-6), no amplification assumed")
    args = ap.parse_args()
    arms: dict[str, list[str]] = {}
    for spec in args.runs:
        label, run = spec.split("=", 1)
        arms.setdefault(label, []).append(run)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    print("| run | strategy | σ | sensitivity | σ/sens | final ε | val ppl | test ppl | s/round |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i, (label, runs) in enumerate(arms.items()):
        color = f"C{i}"
        curves, vals, tests = [], [], []
        for j, run in enumerate(runs):
            pts, s, secs = _load(run)
            curves.append(pts)
            priv = s.get("privacy", s)
            d = priv.get("dpftrl", {})
            vals.append(s["val_perplexity"])
            tests.append(s["test_perplexity"])
            name = label if len(runs) == 1 else f"{label} #{j + 1}"
            print(f"| {name} | {d.get('kind')} (bands {d.get('bands')}, buffers {d.get('buffers')}) | "
                  f"{priv['noise_multiplier']:.3f} | {d.get('sensitivity', float('nan')):.3f} | "
                  f"{d.get('effective_noise_multiplier', float('nan')):.3f} | {priv['epsilon']:.4f} | "
                  f"{s['val_perplexity']:.1f} | {s['test_perplexity']:.1f} | {secs:.1f} |")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, alpha=0.35 if len(runs) > 1 else 1.0,
                    linewidth=1, marker="o", markersize=2, label=None if len(runs) > 1 else label)
        if len(runs) > 1:
            print(f"| {label}, mean of {len(runs)} | | | | | | {_spread(vals)} | {_spread(tests)} | |")
            common = sorted(set.intersection(*(set(r for r, _ in c) for c in curves)))
            mean = [sum(dict(c)[r] for c in curves) / len(curves) for r in common]
            ax.plot(common, mean, color=color, linewidth=2.2, label=f"{label} (mean of {len(runs)})")
    ax.set_xlabel("round")
    ax.set_ylabel("validation perplexity")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(args.title)
    fig.savefig(args.out, dpi=110, bbox_inches="tight")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
