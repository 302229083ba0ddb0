"""The audit's picture: exposure of every canary (inserted vs held out), optionally beside another audit (DP vs non-DP)."""

from __future__ import annotations

from pathlib import Path


def plot_exposure(report: dict, path: Path, other: dict | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    audits = [(r["run"].get("recipe", "run"), r) for r in ([report, other] if other else [report])]
    fig, axes = plt.subplots(1, len(audits), figsize=(5.5 * len(audits), 4), sharey=True, squeeze=False)
    for ax, (name, r) in zip(axes[0], audits):
        ins = sorted((c["exposure"] for c in r["canaries"]["sentences_inserted"]), reverse=True)
        out = sorted((c["exposure"] for c in r["canaries"]["sentences_held_out"]), reverse=True)
        ax.plot(range(len(ins)), ins, "o", color="tab:red", label="inserted")
        ax.plot(range(len(out)), out, "s", mfc="none", color="tab:blue", label="held out")
        ax.axhline(r["exposure"]["max_possible"], color="gray", ls="--", lw=1, label="max possible")
        eps = r["formal"]["epsilon"]
        ax.set_title(f"{name}: formal ε = {eps if not isinstance(eps, float) else round(eps, 2)}, "
                     f"verdict: {r['verdict']}\nrescoring promotes {r['rescoring']['promoted_inserted']:.0%} inserted, "
                     f"{r['rescoring']['promoted_held_out']:.0%} held out", fontsize=9)
        ax.set_xlabel("canary (sorted by exposure)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("exposure (bits)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
