"""Where is the rescoring gain lost? Dev-tuned vs test-tuned (cheating) WER of each LM and of feature combinations.

Reads the .npz files of scripts/asr_features.py. For each system (one LM, or several LMs each with its own weight,
plus a word-count weight) it prints: dev-tuned test WER (the honest number), the best test WER any weights on the
grid reach when tuned *on the test set itself* (an upper bound of the score formula: no tuning method can beat it),
and the WER when the LM alone picks (first-pass score only breaks ties). The gap between the first two is tuning
noise; the gap between the upper bound and the oracle is what the LM/formula cannot see. Example:

    python scripts/asr_ceiling.py --feat /tmp/asr2/feat --dev dev --test slt --test awb \
        --system dp --system kn --system dp+ps3
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np

ALPHAS = np.concatenate([[0.0], np.round(np.logspace(-4, -1, 31), 8)])
ALPHAS_MULTI = np.concatenate([[0.0], np.round(np.logspace(-4, -1, 16), 8)])
BETA_PER_ALPHA = np.round(np.linspace(-5, 5, 21), 6)


def load(path: Path) -> dict[str, np.ndarray]:
    d = dict(np.load(path, allow_pickle=True))
    v = d["valid"]
    d["base0"] = np.where(v, d["base"] - np.max(np.where(v, d["base"], -np.inf), axis=1, keepdims=True), -np.inf)
    d["lm_rank"] = np.broadcast_to(np.log1p(np.arange(v.shape[1]))[None], v.shape).copy()
    return d


def errors(d: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Per-utterance word errors of the hypothesis maximising base + sum(weight * feature)."""
    s = d["base0"].copy()
    for k, w in weights.items():
        s = s + w * np.where(d["valid"], d[k], 0.0)
    idx = np.argmax(np.where(d["valid"], s, -np.inf), axis=1)
    return np.take_along_axis(d["errors"], idx[:, None], axis=1)[:, 0]


def best_weights(d: dict[str, np.ndarray], feats: list[str]) -> tuple[int, dict[str, float]]:
    """Grid search (ties: smaller total weight) of one alpha per feature ("rank" = log(1 + first-pass rank)) and beta = max(alpha) * g."""
    grid = ALPHAS if len(feats) == 1 else ALPHAS_MULTI
    best: tuple[tuple[int, float], dict[str, float]] | None = None
    for vals in itertools.product(grid, repeat=len(feats)):
        scale = max(vals)
        for g in BETA_PER_ALPHA if scale > 0 else (0.0,):
            w = {f"lm_{f}": float(a) for f, a in zip(feats, vals)} | {"words": float(scale * g)}
            key = (int(errors(d, w).sum()), sum(vals) + abs(scale * g))
            if best is None or key < best[0]:
                best = (key, w)
    assert best is not None
    return best[0][0], best[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feat", required=True, help="directory of asr_features.py .npz files")
    ap.add_argument("--dev", required=True)
    ap.add_argument("--test", action="append", required=True)
    ap.add_argument("--system", action="append", required=True, help="LM names joined by '+', e.g. dp+ps3")
    ap.add_argument("--json")
    args = ap.parse_args()
    feat = Path(args.feat)
    dev = load(feat / f"{args.dev}.npz")
    tests = {t: load(feat / f"{t}.npz") for t in args.test}
    rows = []
    for k, t in tests.items():
        n = t["ref_words"].sum()
        first = t["errors"][:, 0].sum() / n
        print(f"{k}: first pass {100 * first:.2f}%, oracle {100 * t['errors'].min(axis=1).sum() / n:.2f}% "
              f"(oracle relative {100 * (1 - t['errors'].min(axis=1).sum() / t['errors'][:, 0].sum()):.1f}%)")
    for system in args.system:
        feats = system.split("+")
        _, w_dev = best_weights(dev, feats)
        row = {"system": system, "dev_weights": w_dev, "sets": {}}
        for k, t in tests.items():
            n, first = t["ref_words"].sum(), t["errors"][:, 0].sum()
            honest = errors(t, w_dev).sum()
            ub, w_ub = best_weights(t, feats)
            lm_only = min(errors(t, {"base0": 1e-9 - 1.0} | {f"lm_{f}": 1.0 for f in feats} | {"words": g}).sum()
                          for g in BETA_PER_ALPHA)
            row["sets"][k] = {"dev_tuned_wer": honest / n, "test_tuned_wer": ub / n, "lm_only_wer": lm_only / n,
                              "dev_tuned_rel": 1 - honest / first, "test_tuned_rel": 1 - ub / first,
                              "test_weights": w_ub}
            print(f"{system:>12} {k}: dev-tuned {100 * honest / n:.2f}% ({100 * (1 - honest / first):+.1f}% rel) | "
                  f"test-tuned ceiling {100 * ub / n:.2f}% ({100 * (1 - ub / first):+.1f}%) | "
                  f"LM alone {100 * lm_only / n:.2f}%", flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
