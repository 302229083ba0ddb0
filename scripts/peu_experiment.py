#!/usr/bin/env python
"""Reproduce Xu et al.'s PEU claim on our data: at equal ε, partial embedding updates beat full updates.

Runs the same recipe with `peu.mode=all` and with PEU variants for the same number of rounds and the same
calibrated σ (target ε in the noise-cohort setting), then writes a Markdown table and a PNG curve of
validation perplexity vs round. Example (the command behind docs/peu_experiment.md):

    .venv/bin/python scripts/peu_experiment.py --data data/chitchat50k --rounds 60 --out docs/peu_experiment
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pflm.config import load_recipe  # noqa: E402
from pflm.io_utils import atomic_write_text  # noqa: E402
from pflm.simulation.simulator import Simulator  # noqa: E402

VARIANTS = {
    "full embedding": ["peu.mode=all"],
    "PEU topk": ["peu.mode=topk"],
    "PEU sampled": ["peu.mode=sampled", "peu.prior=frequency"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/chitchat_large_vocab.yaml")
    ap.add_argument("--data", required=True)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--k", type=int, default=5000)
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--runs", default="/tmp/pflm_peu_runs")
    ap.add_argument("--out", default="docs/peu_experiment")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of: " + ", ".join(VARIANTS))
    ap.add_argument("overrides", nargs="*", help="extra recipe overrides for every variant")
    args = ap.parse_args()
    results = {}
    chosen = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    for name in chosen:
        ov = VARIANTS[name]
        tag = name.replace(" ", "_")
        cfg = load_recipe(args.recipe, [
            f"data.dir={args.data}", f"output_dir={args.runs}", f"name={tag}", f"rounds={args.rounds}",
            f"server.eval_every={args.eval_every}", f"server.checkpoint_every={args.rounds}", f"peu.k={args.k}",
            "model.lora.rank=0", "data.test_users=20", *ov, *args.overrides,
        ])
        run_dir = cfg.run_dir
        if run_dir.exists():
            import shutil

            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        summary = Simulator(cfg).run(progress=True)
        curve = [(m["round"] + 1, m["val_perplexity"]) for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                 if "val_perplexity" in m]
        results[name] = {"summary": summary, "curve": curve, "seconds": time.perf_counter() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        xs, ys = zip(*r["curve"])
        ax.plot(xs, ys, marker="o", label=name)
    s0 = next(iter(results.values()))["summary"]
    ax.set_xlabel("round")
    ax.set_ylabel("validation perplexity (full softmax)")
    ax.set_yscale("log")
    ax.set_title(f"equal privacy: ε={s0['epsilon']:.2f}, δ={s0['delta']:g}, σ={s0['noise_multiplier']:.3f}")
    ax.legend()
    fig.tight_layout()
    tmp = out.with_suffix(".png.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    tmp.replace(out.with_suffix(".png"))
    lines = [
        "# PEU vs full-embedding updates at equal ε", "",
        f"Command: `.venv/bin/python scripts/peu_experiment.py --data {args.data} --rounds {args.rounds} --k {args.k} "
        f"--eval-every {args.eval_every} --variants '{args.variants}' --out {args.out} {' '.join(args.overrides)}`", "",
        f"Recipe {args.recipe}; ε={s0['epsilon']}, δ={s0['delta']}, σ={s0['noise_multiplier']}, "
        f"{s0['epsilon_refers_to']}.", "",
        "| variant | released params / round | val ppl | test word ppl | wall s |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        s = r["summary"]
        lines.append(f"| {name} | {s['release_dim']:,} | {s['val_perplexity']:.1f} | {s['test_word_perplexity']:.1f} | {r['seconds']:.0f} |")
    lines += ["", f"![curve]({out.with_suffix('.png').name})", ""]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
