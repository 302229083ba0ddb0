"""Measure the ASR rescoring table of docs/asr_results.md: DP vs non-private vs NON-PRIVATE n-gram vs first pass.

Runs `pflm.evaluation.compare` (the code behind `pflm rescore`) on several test sets at once, with every LM's
sentence scores cached on disk (scoring 50-best lists is the slow part on 2 cores), for both OOV scorings
(`<unk>` alone vs `<unk>` + public prior). Example:

    python scripts/asr_results.py --runs /tmp/asr/runs/dp /tmp/asr/runs/fl --data /tmp/asr/data \
        --dev /tmp/asr/nbest/dev_slt.jsonl --test slt=/tmp/asr/nbest/test_slt.jsonl \
        --test awb=/tmp/asr/nbest/test_awb.jsonl --out /tmp/asr/results --kenlm
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pflm.evaluation.compare import LMSource, compare  # noqa: E402
from pflm.evaluation.ensemble import EnsembleScorer, ensemble_privacy_label  # noqa: E402
from pflm.evaluation.compare_report import format_lines, to_json, write_plot  # noqa: E402
from pflm.evaluation.nbest import read_nbest  # noqa: E402
from pflm.evaluation.rescore import RescoreConfig  # noqa: E402
from pflm.evaluation.rescore_systems import privacy_label  # noqa: E402
from pflm.evaluation.tail_words import rare_predicate  # noqa: E402


class CachedScorer:
    """Wraps a SentenceScorer; remembers every sentence score in a pickle so reruns score only new sentences."""

    def __init__(self, inner, path: Path, weights: Path | None = None) -> None:
        self.inner, self.path = inner, path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.cache: dict[str, float] = pickle.loads(path.read_bytes()) if path.is_file() else {}
        if weights is not None:  # a run directory retrained in place must not reuse its old scores
            stamp, digest = path.with_suffix(".weights"), hashlib.sha256(weights.read_bytes()).hexdigest()
            if stamp.is_file() and stamp.read_text().strip() != digest:
                self.cache = {}
            stamp.write_text(digest + "\n")
        self.vocab = getattr(inner, "vocab", None)

    def normalize(self, text: str) -> str:
        return self.inner.normalize(text)

    def score(self, texts: list[str]) -> list[float]:
        todo = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if todo:
            self.cache.update(zip(todo, self.inner.score(todo)))
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")  # concurrent runs: last writer wins, none crashes
            tmp.write_bytes(pickle.dumps(self.cache))
            tmp.replace(self.path)
        return [self.cache[t] for t in texts]


class WithoutSpread:
    """`<unk>`-only scores derived from cached public-prior scores: subtract log p_public(w) of every OOV word."""

    def __init__(self, cached: CachedScorer, vocab, prior) -> None:
        self.inner, self.vocab, self.prior = cached, vocab, prior

    def normalize(self, text: str) -> str:
        return self.inner.normalize(text)

    def score(self, texts: list[str]) -> list[float]:
        return [s - sum(self.prior.logprob(w) for w in t.split() if w not in self.vocab)
                for s, t in zip(self.inner.score(texts), texts)]


def _key(*parts: str) -> str:
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def run_scorer(inner, cache: str | Path, run: str | Path) -> CachedScorer:
    """The cached scorer of a run directory's model (public OOV prior); the cache follows its weights file."""
    path = Path(cache) / f"{Path(run).name}-{_key(str(Path(run).resolve()), 'public')}.pkl"
    return CachedScorer(inner, path, Path(run) / "model.safetensors")


def spec_scorer(spec: str, cache: str | Path) -> tuple[str, CachedScorer | EnsembleScorer]:
    """(name, cached public-prior scorer) of a run directory, or of `RUN_A+RUN_B` scored as one ensemble."""
    from pflm.evaluation.lm_scorer import load_scorer

    members = spec.split("+")
    scorers = [run_scorer(load_scorer(m, oov_scoring="public"), cache, m) for m in members]
    names = [Path(m).name for m in members]
    return "+".join(names), scorers[0] if len(scorers) == 1 else EnsembleScorer(scorers, names)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True,
                    help="pflm train run directories (first = main LM); RUN_A+RUN_B scores the runs as one ensemble")
    ap.add_argument("--data", help="prepare store for the NON-PRIVATE Kneser-Ney baseline (train split)")
    ap.add_argument("--order", type=int, default=3)
    ap.add_argument("--dev", required=True)
    ap.add_argument("--test", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache", default="/tmp/asr/score_cache")
    ap.add_argument("--oov", nargs="+", default=["public", "unk"], choices=["public", "unk"])
    ap.add_argument("--rare-zipf", type=float, default=3.0)
    ap.add_argument("--bootstrap", type=int, default=10000)
    ap.add_argument("--smooth", type=int, default=0, help="RescoreConfig.smooth: neighbour-averaged alpha choice")
    ap.add_argument("--kenlm", action="store_true", help="check the n-gram's ARPA file with the kenlm module")
    args = ap.parse_args()
    from pflm.evaluation.lm_scorer import load_scorer

    out, cache = Path(args.out), Path(args.cache)
    out.mkdir(parents=True, exist_ok=True)
    cache.mkdir(parents=True, exist_ok=True)
    dev = read_nbest(args.dev)
    tests = {k: read_nbest(v) for k, v in (s.split("=", 1) for s in args.test)}
    report: dict = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    ngram = None
    if args.data:
        from pflm.evaluation.ngram_baseline import PRIVACY_LABEL, NgramScorer, train_ngram_baseline
        from pflm.evaluation.oov_prior import PublicOOVPrior

        first = load_scorer(args.runs[0].split("+")[0])
        t0 = time.time()
        lm_cache = cache / f"kn{args.order}-model-{_key(str(Path(args.data).resolve()), str(len(first.vocab)))}.pkl"
        if lm_cache.is_file():
            from pflm.data.store import FederatedData

            lm, normalize = pickle.loads(lm_cache.read_bytes()), FederatedData.open(args.data).normalizer
        else:
            lm, normalize = train_ngram_baseline(args.data, order=args.order, vocab=first.vocab)
            lm_cache.write_bytes(pickle.dumps(lm))
            report["ngram_train_seconds"] = time.time() - t0
        report["ngram_sizes"] = [len(lm.prob[k]) for k in range(1, args.order + 1)]
        arpa = lm.write_arpa(out / f"kn{args.order}.arpa")
        if args.kenlm:
            import math

            import kenlm

            km = kenlm.Model(str(arpa))
            sents = sorted({normalize(h.text) for u in dev[:100] for h in u.nbest})
            diffs = [abs(km.score(s, bos=True, eos=True) * math.log(10) - lm.sentence_logprob(s)[0]) for s in sents]
            report["kenlm_check"] = {"sentences": len(sents), "max_abs_diff_nats": max(diffs)}
            print(f"kenlm check on {len(sents)} sentences: max |diff| {max(diffs):.2e} nats")
        ngram = (lm, normalize, PublicOOVPrior(lm.vocab), PRIVACY_LABEL, NgramScorer)
    cached = []  # (name, privacy, CachedScorer of public-prior scores, vocab, prior)
    for run in args.runs:
        if "+" in run:  # RUN_A+RUN_B: the runs scored as one LM, privacy composed (pflm rescore --ensemble)
            if "unk" in args.oov:
                raise SystemExit(f"--runs {run}: an ensemble is scored with --oov public only")
            name, ens = spec_scorer(run, cache)
            cached.append((f"LM {name}", ensemble_privacy_label(run.split("+")), ens, ens.vocab, None))
            continue
        inner = load_scorer(run, oov_scoring="public")
        cached.append((f"LM {Path(run).name}", privacy_label(Path(run)), run_scorer(inner, cache, run), inner.vocab,
                       inner.oov_prior))
    if ngram:
        lm, normalize, prior, label, cls = ngram
        path = cache / f"kn{args.order}-{_key(str(Path(args.data).resolve()), 'public', str(len(lm.vocab)))}.pkl"
        sc = cls(lm, normalize, prior)
        cached.append((f"{args.order}-gram KN", label, CachedScorer(sc, path), sc.vocab, prior))
    for oov in args.oov:
        sources = [LMSource(name, priv, c if oov == "public" else WithoutSpread(c, vocab, prior))
                   for name, priv, c, vocab, prior in cached]
        t0 = time.time()
        cmp = compare(dev, tests, sources, rare_predicate(args.rare_zipf),
                      interpolate=(sources[0].name, sources[-1].name) if ngram else None,
                      pairs=[(s.name, sources[0].name) for s in sources[1:]], vocab=cached[0][3],
                      resamples=args.bootstrap, config=RescoreConfig(smooth=args.smooth))
        lines = format_lines(cmp, args.rare_zipf)
        (out / f"table_oov_{oov}.txt").write_text("\n".join(lines) + "\n")
        report[f"oov_{oov}"] = to_json(cmp, args.rare_zipf, args.bootstrap)
        report[f"oov_{oov}_seconds"] = time.time() - t0
        write_plot(cmp, out / f"comparison_oov_{oov}.png")
        print(f"== OOV scoring: {oov}")
        print("\n".join(lines), flush=True)
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
