"""`pflm rescore` (tune alpha/beta on dev N-best, report test WER) and `pflm nbest` (make real N-best lists)."""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pflm.errors import ConfigError, DataError, PflmError
from pflm.io_utils import atomic_directory


def parse_grid(spec: str, name: str) -> tuple[float, ...]:
    """`a,b,c` (explicit values) or `start:stop:step` (inclusive of stop)."""
    try:
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            if step <= 0 or stop < start:
                raise ValueError
            n = int(round((stop - start) / step)) + 1
            return tuple(round(start + i * step, 10) for i in range(n) if start + i * step <= stop + 1e-9)
        return tuple(float(x) for x in spec.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--{name} '{spec}' is not 'start:stop:step' or a comma list; e.g. 0:2:0.05") from None


def _fmt(x: float) -> str:
    return f"{x:.4f}"


def _load_scorer(run_dir: str, **kwargs: Any) -> Any:
    try:
        from pflm.evaluation.lm_scorer import load_scorer
    except ModuleNotFoundError as e:
        if e.name == "pflm.evaluation.lm_scorer":
            raise PflmError("pflm.evaluation.lm_scorer is not available in this install; update pflm") from None
        raise
    return load_scorer(run_dir, **kwargs)


@dataclass
class RescoreOptions:
    """What `pflm rescore` compares beyond the run's own LM (defaults: nothing else; see docs/rescoring.md)."""

    extra_test: dict[str, str] = field(default_factory=dict)
    compare: list[str] = field(default_factory=list)
    ensemble: list[str] = field(default_factory=list)  # runs scored together with the checkpoint as one LM
    ngram_data: str | None = None
    ngram_order: int = 3
    interpolate: bool = False
    oov_scoring: str = "public"
    rare_zipf: float = 3.0
    bootstrap: int = 10_000
    seed: int = 0


@dataclass
class RescoreResult:
    tuned: Any  # TuneResult of the run's LM
    test: Any  # EvalResult on --test
    comparison: Any  # pflm.evaluation.compare.Comparison


def rescore_run(run_dir: Path, dev: str | Path, test_path: str | Path, config: Any, out_dir: Path,
                options: RescoreOptions | None = None) -> RescoreResult:
    """Rescore with run_dir's LM (and the systems `options` add), every weight tuned on dev only; write
    out_dir/{summary.json,test_utterances.jsonl,dev_grid.tsv,comparison.png} atomically."""
    from pflm.evaluation.compare import compare
    from pflm.evaluation.compare_report import to_json, write_plot
    from pflm.evaluation.nbest import read_nbest
    from pflm.evaluation.rescore import evaluate
    from pflm.evaluation.rescore_systems import ensemble_source, ngram_source, run_source, spec_source
    from pflm.evaluation.tail_words import rare_predicate

    opt = options or RescoreOptions()
    if opt.interpolate and not opt.ngram_data:
        raise ConfigError("--interpolate mixes the run's LM with the n-gram baseline; also pass --ngram-data DIR")
    if opt.ensemble:
        sources = [ensemble_source([str(run_dir), *opt.ensemble], _load_scorer, opt.oov_scoring)]
    else:
        sources = [run_source(str(run_dir), _load_scorer, opt.oov_scoring)]
    sources += [spec_source(d, _load_scorer, opt.oov_scoring) for d in opt.compare]
    vocab = getattr(sources[0].scorer, "vocab", None)
    if opt.ngram_data:
        print("NOTE: the n-gram baseline is trained on the train users' text WITHOUT noise: its rows (and the "
              "interpolation) are NON-PRIVATE comparisons, not covered by any epsilon; do not publish them as private")
        sources.append(ngram_source(opt.ngram_data, opt.ngram_order, vocab, opt.oov_scoring))
    interpolate = (sources[0].name, sources[-1].name) if opt.interpolate else None
    pairs = [(s.name, sources[0].name) for s in sources[1:]]
    dev_utts = read_nbest(dev)  # tuning sees only these; the test sets are scored with the fixed values
    tests = {"test": read_nbest(test_path), **{k: read_nbest(v) for k, v in opt.extra_test.items()}}
    cmp = compare(dev_utts, tests, sources, rare_predicate(opt.rare_zipf), config, interpolate=interpolate,
                  pairs=pairs, vocab=vocab, resamples=opt.bootstrap, seed=opt.seed)
    assert cmp.main_tuned is not None
    tuned = cmp.main_tuned
    test = evaluate(cmp.main_scored["test"], tuned.alpha, tuned.beta)
    summary = {
        "checkpoint": str(run_dir),
        "ensemble": list(opt.ensemble),
        "privacy": sources[0].privacy,
        "dev": str(dev),
        "test": str(test_path),
        "alpha": tuned.alpha,
        "beta": tuned.beta,
        "grid_points": len(tuned.grid),
        "dev_utterances": tuned.dev_utterances,
        "dev_ref_words": tuned.dev_ref_words,
        "dev_first_pass_wer": tuned.dev_first_pass_wer,
        "dev_rescored_wer": tuned.dev_rescored_wer,
        "dev_oracle_wer": tuned.dev_oracle_wer,
        "test_utterances": test.utterances,
        "test_ref_words": test.ref_words,
        "first_pass_wer": test.first_pass_wer,
        "rescored_wer": test.rescored_wer,
        "oracle_wer": test.oracle_wer,
        "relative_reduction": test.relative_reduction,
        "oov_scoring": opt.oov_scoring,
        "extra_test": opt.extra_test,
        "comparison": to_json(cmp, opt.rare_zipf, opt.bootstrap),
    }
    with atomic_directory(out_dir, overwrite=True) as tmp:
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        (tmp / "test_utterances.jsonl").write_text(
            "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in test.rows), encoding="utf-8"
        )
        (tmp / "dev_grid.tsv").write_text(
            "alpha\tbeta\tdev_wer\n" + "".join(f"{a:.8g}\t{b:.8g}\t{w:.6f}\n" for a, b, w in tuned.grid),
            encoding="utf-8",
        )
        write_plot(cmp, tmp / "comparison.png")
    return RescoreResult(tuned, test, cmp)


def run_rescore(args: argparse.Namespace) -> int:
    from pflm.evaluation.compare_report import format_lines
    from pflm.evaluation.rescore import DEFAULT_ALPHA_GRID, RescoreConfig
    from pflm.evaluation.rescore_systems import parse_named_paths

    run_dir = Path(args.checkpoint)
    if not run_dir.exists():
        raise DataError(f"--checkpoint {run_dir} does not exist; pass a `pflm train` run directory")
    config = RescoreConfig(
        alpha_grid=parse_grid(args.alpha_grid, "alpha-grid") if args.alpha_grid else DEFAULT_ALPHA_GRID,
        beta_grid=parse_grid(args.beta_grid, "beta-grid") if args.beta_grid else None,
        batch_size=args.batch_size,
        smooth=args.smooth,
    )
    options = RescoreOptions(
        extra_test=parse_named_paths(args.extra_test, "--extra-test"), compare=list(args.compare or []),
        ensemble=list(args.ensemble or []),
        ngram_data=args.ngram_data, ngram_order=args.ngram_order, interpolate=args.interpolate,
        oov_scoring=args.oov_scoring, rare_zipf=args.rare_zipf, bootstrap=args.bootstrap, seed=args.seed,
    )
    out_dir = Path(args.out) if args.out else run_dir / "rescore"
    result = rescore_run(run_dir, args.dev, args.test, config, out_dir, options)
    tuned, test = result.tuned, result.test
    for line in format_lines(result.comparison, options.rare_zipf):
        print(line)
    print(f"plot: {out_dir / 'comparison.png'}")
    print(f"tuned on dev over {len(tuned.grid)} (alpha, beta) points: alpha={tuned.alpha:.6g} beta={tuned.beta:.6g}")
    print(f"{'set':<5} {'utts':>6} {'words':>7} {'first_pass':>11} {'rescored':>9} {'oracle':>7}")
    print(
        f"{'dev':<5} {tuned.dev_utterances:>6} {tuned.dev_ref_words:>7} {_fmt(tuned.dev_first_pass_wer):>11} "
        f"{_fmt(tuned.dev_rescored_wer):>9} {_fmt(tuned.dev_oracle_wer):>7}"
    )
    print(
        f"{'test':<5} {test.utterances:>6} {test.ref_words:>7} {_fmt(test.first_pass_wer):>11} "
        f"{_fmt(test.rescored_wer):>9} {_fmt(test.oracle_wer):>7}"
    )
    print(f"per-utterance output: {out_dir / 'test_utterances.jsonl'}")
    print(f"relative_reduction: {_fmt(test.relative_reduction)}")
    print(f"first_pass_wer: {_fmt(test.first_pass_wer)}")
    print(f"rescored_wer: {_fmt(test.rescored_wer)}")
    print(f"oracle_wer: {_fmt(test.oracle_wer)}")
    return 0


def select_sentences(
    users: Sequence[str],
    user_texts: Callable[[str], Iterable[str]],
    num: int,
    seed: int = 0,
    min_words: int = 3,
    max_words: int = 20,
    id_prefix: str = "",
) -> list[tuple[str, str]]:
    """Seeded choice of `num` sentences of min..max words, one per user per round over shuffled users.

    utt ids are `<prefix><user>-<index of the sentence in the user's texts>`; users' texts are loaded lazily.
    """
    order = sorted(users)
    rng = random.Random(seed)
    rng.shuffle(order)
    pools: dict[str, list[tuple[int, str]]] = {}
    chosen: list[tuple[str, str]] = []
    while len(chosen) < num:
        progressed = False
        for user in order:
            if len(chosen) >= num:
                break
            if user not in pools:
                pools[user] = [
                    (i, t) for i, t in enumerate(user_texts(user)) if min_words <= len(t.split()) <= max_words
                ]
                rng.shuffle(pools[user])
            if pools[user]:
                i, text = pools[user].pop()
                chosen.append((f"{id_prefix}{user}-{i}", text))
                progressed = True
        if not progressed:
            break
    return chosen


def _sentences_from_file(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        raise DataError(f"--sentences {path} not found; give a text file with one sentence per line")
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    return [(f"sent-{i:05d}", ln) for i, ln in enumerate(lines, start=1) if ln]


def run_nbest(args: argparse.Namespace) -> int:
    from pflm.evaluation.asr_nbest import DEFAULT_CACHE_DIR, generate_nbest_with_stats, resolve_normalize
    from pflm.evaluation.nbest import read_nbest
    from pflm.evaluation.wer import errors_batch, wer_from_counts

    if args.num < 1:
        raise ConfigError(f"--num {args.num} must be >= 1")
    normalize = resolve_normalize(None)
    if args.sentences:
        sentences = _sentences_from_file(Path(args.sentences))[: args.num]
    elif args.data:
        from pflm.data.store import FederatedData

        fd = FederatedData.open(args.data)
        normalize = getattr(fd, "normalizer", None) or normalize  # the dataset's exact normalisation settings
        sentences = select_sentences(
            list(fd.users(args.split)),
            lambda u: fd.user_texts(args.split, u),
            args.num,
            seed=args.seed,
            id_prefix=f"{args.split}-",
        )
    else:
        raise ConfigError("give --data DIR (a `pflm prepare` output) or --sentences FILE")
    if not sentences:
        raise DataError("no sentences of 3-20 words found; check --split / --sentences")
    path, st = generate_nbest_with_stats(
        sentences,
        args.out,
        voice=args.voice,
        nbest=args.nbest,
        cache_dir=args.cache_dir or DEFAULT_CACHE_DIR,
        normalize=normalize,
        workers=args.workers,
    )
    utts = read_nbest(path)
    first = errors_batch([u.ref for u in utts], [max(u.nbest, key=lambda h: h.score).text for u in utts])
    pairs = [(u.ref, h.text) for u in utts for h in u.nbest]
    per_hyp = iter(errors_batch([r for r, _ in pairs], [h for _, h in pairs]))
    oracle = sum(min(next(per_hyp)[0] for _ in u.nbest) for u in utts)
    words = sum(n for _, n in first)
    print(f"wrote {len(utts)} utterances to {path} ({st.cached} cached, {st.decoded} decoded, {st.wall_seconds:.1f} s)")
    if st.decoded:
        print(f"decode: {st.worker_seconds / st.decoded:.3f} s/utt, real-time factor "
              f"{st.worker_seconds / max(st.audio_seconds, 1e-9):.3f}")
    print(f"first_pass_wer: {_fmt(wer_from_counts(sum(e for e, _ in first), words))}")
    print(f"oracle_wer: {_fmt(wer_from_counts(oracle, words))}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("rescore", help="rescore ASR N-best lists with a trained LM; tune on dev, report test")
    p.add_argument("--checkpoint", required=True, help="a `pflm train` run directory")
    p.add_argument("--dev", required=True, help="dev N-best JSONL (alpha/beta are tuned on it)")
    p.add_argument("--test", required=True, help="test N-best JSONL (read only after tuning)")
    p.add_argument("--out", help="output directory (default: RUN_DIR/rescore)")
    p.add_argument("--smooth", type=int, default=0, metavar="K",
                   help="choose alpha by dev WER averaged over K grid neighbours on each side (flat minimum; 0 = off)")
    p.add_argument("--alpha-grid", help="LM weights: start:stop:step or a,b,c (default: 0 and 1e-4..10 log-spaced)")
    p.add_argument("--beta-grid", help="word bonuses: start:stop:step or a,b,c; write --beta-grid=-5:5:0.5 for a negative start "
        "(default: alpha * (-5..5 step 0.5))")
    p.add_argument("--batch-size", type=int, default=256, help="sentences per LM scoring batch")
    p.add_argument("--extra-test", action="append", metavar="NAME=PATH",
                   help="another test N-best set scored with the dev-tuned values (e.g. another voice); repeatable")
    p.add_argument("--compare", action="append", metavar="RUN_DIR",
                   help="another `pflm train` run to tune and test the same way (e.g. the non-private LM), or "
                   "RUN_A+RUN_B for another ensemble; repeatable")
    p.add_argument("--ensemble", action="append", metavar="RUN_DIR",
                   help="score this run together with --checkpoint as one LM (mean sentence log-probability); its "
                   "privacy is every member's releases composed; repeatable")
    p.add_argument("--ngram-data", metavar="DATA_DIR",
                   help="train the NON-PRIVATE Kneser-Ney baseline on this `pflm prepare` store's train split")
    p.add_argument("--ngram-order", type=int, default=3, help="n-gram baseline order (default: 3)")
    p.add_argument("--interpolate", action="store_true",
                   help="also tune a log-linear mix of the run's LM and the n-gram baseline (NON-PRIVATE)")
    p.add_argument("--oov-scoring", choices=("public", "unk"), default="public",
                   help="OOV words: <unk> + public wordfreq/character prior (default) or <unk> alone")
    p.add_argument("--rare-zipf", type=float, default=3.0,
                   help="a word is rare below this public wordfreq Zipf frequency (default 3.0 = 1 per million)")
    p.add_argument("--bootstrap", type=int, default=10000, help="bootstrap / permutation resamples (default 10000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and permutation draws (public)")
    p.set_defaults(func=run_rescore)

    q = subparsers.add_parser("nbest", help="synthesize sentences (flite), decode (pocketsphinx), write N-best JSONL")
    q.add_argument("--data", help="a `pflm prepare` output directory")
    q.add_argument("--split", default="test", help="split to take users from (default: test)")
    q.add_argument("--sentences", help="alternative to --data: text file, one sentence per line")
    q.add_argument("--num", type=int, default=200, help="number of sentences (default: 200)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--voice", default="slt", help="flite voice: slt, awb, kal16, rms, kal")
    q.add_argument("--nbest", type=int, default=50, help="max unique hypotheses per utterance")
    q.add_argument("--workers", type=int, default=2)
    q.add_argument("--cache-dir", help="decode cache (default: ~/.cache/pflm/nbest or $PFLM_CACHE_DIR/nbest)")
    q.add_argument("--out", required=True, help="output N-best JSONL")
    q.set_defaults(func=run_nbest)
