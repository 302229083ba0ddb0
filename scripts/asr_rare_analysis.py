"""Why rare-word WER moves little under N-best rescoring: where the rare reference words are, and what dev shows.

Part 1 (any N-best file, no LM, descriptive): each rare reference token (public wordfreq Zipf < --rare-zipf) is put
in the recognizer's lexicon or not (pocketsphinx's shipped cmudict by default), listed by wordfreq or not (typos,
elongations, digits), in the LM's vocabulary, in any hypothesis of its utterance, and matched by the first pass.
A word no hypothesis holds cannot be recovered by rescoring; one the first pass already has cannot be gained.

Part 1b (--depth-check K, dev only): re-synthesise and re-decode the first K dev utterances holding an in-lexicon
rare word that no hypothesis has, with N-best depth 50, 200 and 1,000, and count the missing words found; and count
how many in-lexicon rare tokens the first pass's own n-gram LM (pocketsphinx en-us.lm.bin) knows.

Part 3 (every set, alpha/beta tuned on dev): could a better rare-word model close the gap? For the LM's own
choices it prints the relative reduction overall and on rare-word utterances, and two bounds for rare-word
utterances: each reachable rare word the choice misses fixed at one error each, and (generous) every rare-word
utterance whose choice misses a reachable rare word switched to its oracle hypothesis.

Part 2 (the --dev file only; it makes choices, so it never reads a test set): the LM's relative WER reduction on
rare-word utterances vs overall, for the Zipf definition and for rare words inside the recognizer's lexicon, and a
sweep of a per-OOV-word bonus added to the LM score (alpha/beta re-tuned on dev for each bonus; for an ensemble, OOV
means outside the union of the members' vocabularies).

    PYTHONPATH=$PWD python scripts/asr_rare_analysis.py --run /tmp/asr7/runs/ensA+/tmp/asr7/runs/ensB \\
        --dev dev_slt1800.jsonl --sets fresh4=test_slt_fresh4_1200.jsonl --cache /tmp/asr6/score_cache
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from asr_results import spec_scorer  # noqa: E402

from pflm.evaluation.nbest import read_nbest  # noqa: E402
from pflm.evaluation.rescore import RescoreConfig, score_nbest, select, tune  # noqa: E402
from pflm.evaluation.tail_words import rare_mask, tail_stats, zipf_frequency  # noqa: E402


def lexicon_words(path: str | None) -> set[str]:
    if path is None:
        import pocketsphinx

        path = os.path.join(pocketsphinx.get_model_path(), "en-us", "cmudict-en-us.dict")
    return {line.split()[0].split("(")[0] for line in open(path, encoding="utf-8") if line.strip()}


def rare_breakdown(utts, lexicon: set[str], vocab, zipf: float) -> Counter[str]:
    """Counts of rare reference tokens by where they are (lexicon, wordfreq, LM vocabulary, hypotheses)."""
    c: Counter[str] = Counter()
    for u in utts:
        first = set(max(u.nbest, key=lambda h: h.score).text.split()) if u.nbest else set()
        anyhyp = set().union(*(h.text.split() for h in u.nbest))
        for w in u.ref.split():
            if zipf_frequency(w) >= zipf:
                continue
            c["rare tokens"] += 1
            c["in recognizer lexicon"] += w in lexicon
            c["not listed by wordfreq (typos, elongations, digits)"] += zipf_frequency(w) == 0.0
            c["contain a digit"] += any(ch.isdigit() for ch in w)
            c["in LM vocabulary"] += vocab is not None and w in vocab
            c["in any N-best hypothesis"] += w in anyhyp
            c["in the first-pass hypothesis"] += w in first
    return c


def print_breakdown(name: str, n_utts: int, c: Counter[str], zipf: float) -> None:
    n = c["rare tokens"]
    print(f"[{name}] {n_utts} utterances, rare reference tokens (Zipf < {zipf}): {n}")
    for k, v in c.items():
        if k != "rare tokens":
            print(f"  {k:<55} {v:>5} ({100 * v / max(n, 1):.1f}%)")
    print(f"  => rescoring can add at most {c['in any N-best hypothesis'] - c['in the first-pass hypothesis']} "
          f"rare tokens of {n}")


def depth_check(dev, lexicon: set[str], zipf: float, k: int) -> None:
    import tempfile

    import pocketsphinx

    from pflm.evaluation.asr_nbest import decode_nbest, synthesize

    model = os.path.join(pocketsphinx.get_model_path(), "en-us", "en-us.lm.bin")
    lm = pocketsphinx.NGramModel(pocketsphinx.Config(), pocketsphinx.LogMath(), model)
    unk = lm.prob(["<no-such-word>"])
    tokens = [w for u in dev for w in u.ref.split() if zipf_frequency(w) < zipf and w in lexicon]
    print(f"[dev] in-lexicon rare tokens {len(tokens)}, known to the first-pass n-gram LM "
          f"{sum(lm.prob([w]) != unk for w in tokens)}")
    todo = []
    for u in dev:
        words = set().union(*(h.text.split() for h in u.nbest))
        miss = [w for w in u.ref.split() if zipf_frequency(w) < zipf and w in lexicon and w not in words]
        if miss:
            todo.append((u, miss))
    decoder, found = pocketsphinx.Decoder(), {50: 0, 200: 0, 1000: 0}
    for u, miss in todo[:k]:
        with tempfile.TemporaryDirectory(prefix="pflm-rare-") as tmp:
            raw = synthesize(u.ref, "slt", tmp)
        for depth in found:
            words = set().union(*(t.split() for t, _ in decode_nbest(decoder, raw, depth, 20 * depth)))
            found[depth] += sum(w in words for w in miss)
    print(f"[dev] {len(todo)} utterances hold in-lexicon rare words no hypothesis has; re-decoding the first "
          f"{min(k, len(todo))} ({sum(len(m) for _, m in todo[:k])} such tokens) finds, by N-best depth: {found}")


def dev_analysis(s, scorer, lexicon: set[str], zipf: float, bonuses: list[float]) -> None:
    """Part 2 on the scored dev set `s` (scorer: the same LM, for its vocabulary and normalisation)."""
    cfg = RescoreConfig(smooth=2)
    noov = np.zeros_like(s.lm)
    if scorer.vocab is not None:
        for i, row in enumerate(s.texts):
            for j, t in enumerate(row):
                noov[i, j] = sum(w not in scorer.vocab for w in scorer.normalize(t).split())
    fp_err = s.errors[:, 0].sum()
    preds = {"Zipf": lambda w: zipf_frequency(w) < zipf,
             "Zipf & in lexicon": lambda w: zipf_frequency(w) < zipf and w in lexicon}

    def tails(idx, pred):
        err = np.take_along_axis(s.errors, idx[:, None], axis=1)[:, 0]
        return err, tail_stats(s.refs, [s.texts[i][int(j)] for i, j in enumerate(idx)], err, pred)

    first = {pname: tails(np.zeros(len(s.refs), dtype=np.int64), pred)[1] for pname, pred in preds.items()}

    print(f"[dev] per-OOV-word bonus added to the LM log-prob (nats), alpha/beta re-tuned on dev (--smooth 2)")
    for b in bonuses:
        sb = dataclasses.replace(s, lm=s.lm + b * noov)
        t = tune(sb, cfg)
        idx = select(sb, t.alpha, t.beta)
        parts = []
        for pname, pred in preds.items():
            f = first[pname]
            err, r = tails(idx, pred)
            parts.append(f"{pname}: {r.rare_utterances} utts rel {100 * (1 - r.rare_utt_wer / f.rare_utt_wer):+.1f}%"
                         f" recall {100 * f.rare_recall:.1f}->{100 * r.rare_recall:.1f}")
        print(f"  bonus {b:>4g}: dev WER {100 * t.dev_rescored_wer:.2f} overall rel "
              f"{100 * (1 - err.sum() / fp_err):+.1f}% | " + " | ".join(parts))


def rare_word_bound(s, idx: np.ndarray, is_rare) -> dict[str, float | int]:
    """Relative reductions of the choice `idx` (overall, rare-word utterances) and the two rare-word bounds."""
    err = np.take_along_axis(s.errors, idx[:, None], axis=1)[:, 0]
    mask = np.asarray(rare_mask(s.refs, is_rare), dtype=bool)
    first_rare, chosen_rare = int(s.errors[mask, 0].sum()), int(err[mask].sum())
    missed = switched = 0
    generous = chosen_rare
    for i in np.flatnonzero(mask):
        chosen = set(s.texts[i][int(idx[i])].split())
        anyhyp = set().union(*(t.split() for t in s.texts[i]))
        miss = sum(1 for w in s.refs[i].split() if is_rare(w) and w in anyhyp and w not in chosen)
        missed += miss
        if miss:
            switched += 1
            generous -= int(err[i] - s.errors[i].min())
    rel = (lambda e: 1 - e / first_rare if first_rare else 0.0)
    return {"overall": 1 - err.sum() / s.errors[:, 0].sum(), "rare_utts": rel(chosen_rare), "missed": missed,
            "per_token_bound": rel(max(chosen_rare - missed, 0)), "switched": switched, "generous_bound": rel(generous)}


def print_bounds(name: str, b: dict[str, float | int]) -> None:
    print(f"[{name}] overall {100 * b['overall']:+.1f}% | rare-word utterances {100 * b['rare_utts']:+.1f}%; "
          f"{b['missed']} reachable rare words missed: fixed at one error each {100 * b['per_token_bound']:+.1f}%; "
          f"{b['switched']} utterances switched to their oracle {100 * b['generous_bound']:+.1f}%")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="run directory, or RUN_A+RUN_B for an ensemble")
    ap.add_argument("--dev", required=True)
    ap.add_argument("--sets", nargs="*", default=[], metavar="NAME=PATH", help="N-best files for parts 1 and 3")
    ap.add_argument("--lexicon", help="recognizer pronunciation dictionary (default: pocketsphinx's cmudict)")
    ap.add_argument("--cache", default="/tmp/asr/score_cache")
    ap.add_argument("--rare-zipf", type=float, default=3.0)
    ap.add_argument("--depth-check", type=int, default=0, metavar="K", help="re-decode K dev utterances (slt voice)")
    ap.add_argument("--bonus", type=float, nargs="+", default=[0, 2, 4, 6, 8])
    args = ap.parse_args()
    lexicon = lexicon_words(args.lexicon)
    _, scorer = spec_scorer(args.run, args.cache)
    dev = read_nbest(args.dev)
    sets = [("dev", dev)] + [(k, read_nbest(v)) for k, v in (x.split("=", 1) for x in args.sets)]
    for name, utts in sets:
        print_breakdown(name, len(utts), rare_breakdown(utts, lexicon, scorer.vocab, args.rare_zipf), args.rare_zipf)
    if args.depth_check:
        depth_check(dev, lexicon, args.rare_zipf, args.depth_check)
    scored = {name: score_nbest(utts, scorer) for name, utts in sets}  # each set scored once, for parts 3 and 2
    tuned = tune(scored["dev"], RescoreConfig(smooth=2))
    print(f"part 3: alpha={tuned.alpha:g} beta={tuned.beta:g} (tuned on dev, --smooth 2)")
    is_rare = (lambda w: zipf_frequency(w) < args.rare_zipf)
    for name, s in scored.items():
        print_bounds(name, rare_word_bound(s, select(s, tuned.alpha, tuned.beta), is_rare))
    dev_analysis(scored["dev"], scorer, lexicon, args.rare_zipf, args.bonus)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
