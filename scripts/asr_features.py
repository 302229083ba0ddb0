"""Dump per-hypothesis rescoring features of N-best sets to .npz, to study where the rescoring gain is lost.

Features (hypotheses in first-pass order, padded): first-pass score, word count, first-pass rank, the log-prob of
pocketsphinx's own bundled 3-gram (public), and the log-prob of each LM given as NAME=RUN_DIR (scored through the
same cached scorer as scripts/asr_results.py, public OOV prior). Word errors against the reference are included so
dev tuning and test evaluation can run from the .npz alone. Example:

    python scripts/asr_features.py --lm dp=/tmp/asr/runs/dp --set dev=/tmp/asr/nbest/dev_slt.jsonl --out /tmp/f
"""

from __future__ import annotations

import argparse
import math
import os
import pickle
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from asr_results import run_scorer  # noqa: E402

from pflm.evaluation.nbest import read_nbest  # noqa: E402
from pflm.evaluation.rescore import score_nbest  # noqa: E402
from pflm.evaluation.compare import _ZeroScorer, lm_matrix  # noqa: E402

LN_1_0001 = math.log(1.0001)  # pocketsphinx's default log base
OOV_NATS = -20.0  # a word pocketsphinx's LM lacks (e.g. "ol") would score log 0


class PocketsphinxLM:
    """Sentence log-prob (nats, with <s> and </s>) under pocketsphinx's bundled en-US 3-gram."""

    def __init__(self) -> None:
        import pocketsphinx
        from pocketsphinx import Config, LogMath, NGramModel

        path = os.path.join(pocketsphinx.get_model_path(), "en-us", "en-us.lm.bin")
        self.model = NGramModel(Config(), LogMath(), path)

    def normalize(self, text: str) -> str:
        return text

    def score(self, texts: list[str]) -> list[float]:
        out = []
        for t in texts:
            words = ["<s>"] + t.split() + ["</s>"]
            total = 0
            for i in range(1, len(words)):
                p = self.model.prob([words[i], words[i - 1]] + ([words[i - 2]] if i >= 2 else []))
                total += p * LN_1_0001 if p > -10**8 else OOV_NATS  # outside its vocabulary: log zero
            out.append(total)
        return out


class _Fixed:
    def __init__(self, normalize, cache: dict[str, float]) -> None:
        self.normalize, self.cache = normalize, cache

    def score(self, texts: list[str]) -> list[float]:
        return [self.cache[t] for t in texts]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm", action="append", default=[], metavar="NAME=RUN_DIR")
    ap.add_argument("--pkl", action="append", default=[], metavar="NAME=SCORE_CACHE",
                    help="scores cached by asr_results.py (e.g. the n-gram's), normalised like the first --lm")
    ap.add_argument("--set", action="append", required=True, metavar="NAME=NBEST_JSONL")
    ap.add_argument("--cache", default="/tmp/asr/score_cache")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from pflm.evaluation.lm_scorer import load_scorer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scorers = {"ps3": PocketsphinxLM()}
    for spec in args.lm:
        name, run = spec.split("=", 1)
        scorers[name] = run_scorer(load_scorer(run, oov_scoring="public"), args.cache, run)
    first = next(iter(v for k, v in scorers.items() if k != "ps3"))
    for spec in args.pkl:
        name, pkl = spec.split("=", 1)
        scorers[name] = _Fixed(first.normalize, pickle.loads(Path(pkl).read_bytes()))
    for spec in args.set:
        name, path = spec.split("=", 1)
        scored = score_nbest(read_nbest(path), _ZeroScorer())
        arrays = {"base": scored.base, "words": scored.words, "errors": scored.errors, "ref_words": scored.ref_words,
                  "valid": np.isfinite(scored.base)}
        for lm_name, sc in scorers.items():
            arrays[f"lm_{lm_name}"] = lm_matrix(scored, sc)
        np.savez(out / f"{name}.npz", **arrays, refs=np.array(scored.refs, dtype=object),
                 texts=np.array([np.array(r, dtype=object) for r in scored.texts] + [None], dtype=object)[:-1])
        print(f"{name}: {len(scored.utt_ids)} utterances -> {out / f'{name}.npz'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
