"""How much dev data does α/β tuning need? Cross-validation on the dev set alone (no test set is read).

Repeatedly splits a large dev N-best set (val users only) into a held-out part of `--heldout` utterances and a
tuning pool; tunes α/β (`pflm.evaluation.rescore.tune`, the code behind `pflm rescore`) on the first `n` pool
utterances for each `--sizes n`, and reports the held-out relative WER reduction over first pass, averaged over
`--repeats` random splits. If a bigger tuning set gives a higher held-out gain, the dev set was limiting. Example:

    python scripts/asr_dev_cv.py --runs /tmp/asr4/runs/e1500 --dev /tmp/asr4/dev_slt1800.jsonl \
        --sizes 300 600 1200 --heldout 600 --repeats 50 --cache /tmp/asr3/score_cache
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pflm.evaluation.nbest import read_nbest  # noqa: E402
from pflm.evaluation.rescore import RescoreConfig, ScoredNBest, evaluate, score_nbest, tune  # noqa: E402
from scripts.asr_results import spec_scorer  # noqa: E402


def subset(s: ScoredNBest, idx: np.ndarray) -> ScoredNBest:
    pick = [int(i) for i in idx]
    return dataclasses.replace(
        s, utt_ids=[s.utt_ids[i] for i in pick], refs=[s.refs[i] for i in pick], texts=[s.texts[i] for i in pick],
        base=s.base[idx], first_pass=s.first_pass[idx], lm=s.lm[idx], words=s.words[idx], errors=s.errors[idx],
        ref_words=s.ref_words[idx])


def heldout_gain(scored: ScoredNBest, tune_idx: np.ndarray, test_idx: np.ndarray, cfg: RescoreConfig) -> float:
    t = tune(subset(scored, tune_idx), cfg)
    return evaluate(subset(scored, test_idx), t.alpha, t.beta).relative_reduction


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--dev", required=True)
    ap.add_argument("--sizes", nargs="+", type=int, default=[300, 600, 1200])
    ap.add_argument("--heldout", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--smooth", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", default="/tmp/asr/score_cache")
    args = ap.parse_args()
    dev = read_nbest(args.dev)
    if args.heldout + max(args.sizes) > len(dev):
        raise SystemExit(f"--heldout {args.heldout} + largest --sizes {max(args.sizes)} exceeds the {len(dev)} "
                         "dev utterances; lower them or use a larger dev set")
    cfg = RescoreConfig(smooth=args.smooth)
    print(f"dev {args.dev}: {len(dev)} utterances; held-out {args.heldout}; {args.repeats} random splits; "
          f"smooth {args.smooth}; mean [2.5%, 97.5%] of the held-out relative WER reduction")
    for run in args.runs:  # RUN_A+RUN_B: the runs scored as one ensemble (pflm rescore --ensemble)
        name, scorer = spec_scorer(run, args.cache)
        scored = score_nbest(dev, scorer)
        rng = np.random.default_rng(args.seed)  # public: which dev utterances tune, which are held out
        gains: dict[int, list[float]] = {n: [] for n in args.sizes}
        for _ in range(args.repeats):
            perm = rng.permutation(len(dev))
            test_idx, pool = perm[: args.heldout], perm[args.heldout:]
            for n in args.sizes:
                gains[n].append(heldout_gain(scored, pool[:n], test_idx, cfg))
        row = "  ".join(f"tune {n}: {100 * np.mean(g):+.2f}% [{100 * np.percentile(g, 2.5):+.2f}, "
                        f"{100 * np.percentile(g, 97.5):+.2f}]" for n, g in gains.items())
        print(f"{name:<12} {row}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
