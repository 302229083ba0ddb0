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


def cross_validate_smoothing(dev: dict[str, np.ndarray], feat: str, ks=(0, 1, 2), repeats: int = 20,
                             seed: int = 0) -> dict[int, float]:
    """Held-out-half dev WER of `RescoreConfig.smooth` = k, by 2-fold CV inside the dev set (random halvings).

    Uses the default grid of `pflm rescore` and its own `_smoothed_choice`, so the tuning rule is chosen on dev only.
    """
    from pflm.evaluation.rescore import DEFAULT_ALPHA_GRID, DEFAULT_BETA_PER_ALPHA, _smoothed_choice

    pairs = [(a, round(a * g, 12) + 0.0) for a in DEFAULT_ALPHA_GRID for g in DEFAULT_BETA_PER_ALPHA]
    pairs = list(dict.fromkeys(pairs))
    per_utt = np.stack([errors(dev, {f"lm_{feat}": a, "words": b}) for a, b in pairs])  # [pairs, utterances]
    rng = np.random.default_rng(seed)
    n = per_utt.shape[1]
    held = {k: 0 for k in ks}
    words = 0
    for _ in range(repeats):
        perm = rng.permutation(n)
        for fit, ev in ((perm[: n // 2], perm[n // 2 :]), (perm[n // 2 :], perm[: n // 2])):
            results = [(int(e), a, b) for e, (a, b) in zip(per_utt[:, fit].sum(axis=1), pairs)]
            plain = min(results, key=lambda r: (r[0], abs(r[1]), abs(r[2])))
            for k in ks:
                _, a, b = _smoothed_choice(results, k) if k else plain
                held[k] += int(per_utt[pairs.index((a, b)), ev].sum())
            words += int(dev["ref_words"][ev].sum())
    return {k: held[k] / words for k in ks}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--feat", required=True, help="directory of asr_features.py .npz files")
    ap.add_argument("--dev", required=True)
    ap.add_argument("--test", action="append", required=True)
    ap.add_argument("--system", action="append", required=True, help="LM names joined by '+', e.g. dp+ps3")
    ap.add_argument("--json")
    ap.add_argument("--cv-smooth", action="store_true", help="also cross-validate --smooth 0/1/2 inside dev")
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
    if args.cv_smooth:
        for system in args.system:
            if "+" not in system:
                cv = cross_validate_smoothing(dev, system)
                print(f"{system:>12} dev 2-fold CV held-out WER: " + ", ".join(
                    f"smooth {k}: {100 * v:.3f}%" for k, v in cv.items()), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
