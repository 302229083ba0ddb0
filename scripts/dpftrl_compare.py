"""Validation-perplexity curves and a table for DP-FTRL vs DP-FedAvg-without-amplification runs (docs/dpftrl.md).

Usage: python scripts/dpftrl_compare.py --runs LABEL=RUN_DIR ... --out docs/dpftrl_curve.png
Reads each run's metrics.jsonl (released values only) and summary.json; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True, help="LABEL=RUN_DIR")
    ap.add_argument("--out", required=True, help="PNG path for the curves")
    ap.add_argument("--title", default="chitchat, ε = 2 (δ = 1e-6), no amplification assumed")
    args = ap.parse_args()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    print("| run | strategy | σ | sensitivity | σ/sens | final ε | val ppl | test ppl | s/round |")
    print("|---|---|---|---|---|---|---|---|---|")
    for spec in args.runs:
        label, run = spec.split("=", 1)
        rows = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines() if x.strip()]
        pts = [(r["round"] + 1, r["val_perplexity"]) for r in rows if "val_perplexity" in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3, label=label)
        s = json.loads((Path(run) / "summary.json").read_text())
        priv = s.get("privacy", s)
        d = priv.get("dpftrl", {})
        secs = sum(r.get("seconds", 0.0) for r in rows) / max(len(rows), 1)
        print(f"| {label} | {d.get('kind')} (bands {d.get('bands')}, buffers {d.get('buffers')}) | "
              f"{priv['noise_multiplier']:.3f} | {d.get('sensitivity', float('nan')):.3f} | "
              f"{d.get('effective_noise_multiplier', float('nan')):.3f} | {priv['epsilon']:.4f} | "
              f"{s['val_perplexity']:.1f} | {s['test_perplexity']:.1f} | {secs:.1f} |")
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
