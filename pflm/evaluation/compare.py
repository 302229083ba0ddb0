"""Compare rescoring systems the way ASR papers do: each LM tuned on dev alone, then test WER with paired statistics.

For every LM source (the DP LM, a non-private LM, the non-private n-gram baseline, a log-linear interpolation of two
of them) alpha/beta (and the interpolation weight) are tuned on the dev N-best set only; every test set (e.g. the
same voice and another voice) is then rescored with those fixed values. Against the first pass, and between chosen
pairs of systems, `pflm.evaluation.significance` gives the paired bootstrap 95% interval of the WER difference
(Bisani & Ney 2004), the paired sign-flip permutation test and the sign test; `pflm.evaluation.tail_words` gives
WER on utterances with rare words (public wordfreq frequency) and rare-word recall.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from pflm.errors import ConfigError
from pflm.evaluation.nbest import NBestUtterance
from pflm.evaluation.rescore import (
    RescoreConfig, ScoredNBest, SentenceScorer, TuneResult, lm_scores, score_nbest, select, tune,
)
from pflm.evaluation.significance import (
    DEFAULT_RESAMPLES, BootstrapResult, TestResult, bootstrap_wer, cluster_paired_bootstrap, paired_bootstrap,
    permutation_test, sign_test,
)
from pflm.evaluation.tail_words import TailStats, nbest_rare_coverage, oov_rate, tail_stats

FIRST_PASS = "first pass"
DEFAULT_LAMBDA_GRID: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(11))


@dataclass
class LMSource:
    """One LM to rescore with; `privacy` is printed next to every number it produces."""

    name: str
    privacy: str
    scorer: SentenceScorer


@dataclass
class SetResult:
    """One system on one test set."""

    errors: np.ndarray
    chosen: list[str]
    wer: float
    wer_low: float
    wer_high: float
    vs_first: BootstrapResult | None
    permutation: TestResult | None
    sign: TestResult | None
    tail: TailStats
    test_tuned_wer: float | None = None  # best WER of the same grid tuned ON THIS TEST SET: a ceiling, not a result
    vs_first_users: BootstrapResult | None = None  # the same CI resampling users (None: one utterance per user)


@dataclass
class SystemResult:
    name: str
    privacy: str
    alpha: float = 0.0
    beta: float = 0.0
    lam: float | None = None  # weight of the first source in an interpolation
    dev_wer: float = 0.0
    sets: dict[str, SetResult] = field(default_factory=dict)


@dataclass
class Comparison:
    systems: list[SystemResult]
    test_sets: list[str]
    oracle_wer: dict[str, float]
    ref_words: dict[str, int]
    utterances: dict[str, int]
    oov: dict[str, dict[str, float]]  # set -> {"nbest_hyp_oov_rate", "ref_oov_rate"}
    pairwise: list[dict[str, Any]]
    main_tuned: TuneResult | None = None
    main_scored: dict[str, ScoredNBest] = field(default_factory=dict)
    rare_coverage: dict[str, tuple[int, int]] = field(default_factory=dict)  # (rare ref words, in some hypothesis)
    oracle_tail: dict[str, TailStats] = field(default_factory=dict)  # tail metrics of the oracle (fewest errors) choice
    users: dict[str, int] = field(default_factory=dict)  # set -> distinct users (sets with user-labelled ids only)


class _ZeroScorer:
    def normalize(self, text: str) -> str:
        return text

    def score(self, texts: list[str]) -> list[float]:
        return [0.0] * len(texts)


def lm_matrix(scored: ScoredNBest, scorer: SentenceScorer, batch_size: int = 256) -> np.ndarray:
    """The scorer's log-probabilities laid out like `scored.lm` (hypotheses in first-pass order, 0 in padding)."""
    norm = {t: scorer.normalize(t) for row in scored.texts for t in row}
    logp = lm_scores(scorer, list(norm.values()), batch_size)
    out = np.zeros_like(scored.lm)
    for i, row in enumerate(scored.texts):
        for j, t in enumerate(row):
            out[i, j] = logp[norm[t]]
    return out


def utterance_users(utt_ids: Sequence[str]) -> np.ndarray | None:
    """The user of each utterance from `pflm nbest --data` ids (`<user>-<sentence index>`); None when every
    utterance is its own user (other id schemes), so a user-level bootstrap would add nothing."""
    # `pflm nbest --sentences FILE` numbers its lines `sent-<n>`: those are sentences of no known user.
    users = [u.rsplit("-", 1)[0] if "-" in u and u.rsplit("-", 1)[1].isdigit() and not u.startswith("sent-") else u
             for u in utt_ids]
    return np.asarray(users) if len(set(users)) < len(users) else None


def _set_result(scored: ScoredNBest, idx: np.ndarray, is_rare: Callable[[str], bool], resamples: int,
                seed: int, users: np.ndarray | None) -> SetResult:
    errors = np.take_along_axis(scored.errors, idx[:, None], axis=1)[:, 0]
    chosen = [scored.texts[i][int(j)] for i, j in enumerate(idx)]
    wer, low, high = bootstrap_wer(errors, scored.ref_words, resamples=resamples, seed=seed)
    first = scored.errors[:, 0]
    is_first = bool(np.all(idx == 0))
    return SetResult(
        errors=errors, chosen=chosen, wer=wer, wer_low=low, wer_high=high,
        vs_first=None if is_first else paired_bootstrap(first, errors, scored.ref_words, resamples, seed=seed),
        permutation=None if is_first else permutation_test(first, errors, resamples, seed=seed),
        sign=None if is_first else sign_test(first, errors),
        tail=tail_stats(scored.refs, chosen, errors, is_rare),
        vs_first_users=None if is_first or users is None else cluster_paired_bootstrap(
            first, errors, scored.ref_words, users, resamples, seed=seed),
    )


def _oracle_tail(scored: ScoredNBest, is_rare: Callable[[str], bool]) -> TailStats:
    """Tail metrics of the per-utterance fewest-errors hypothesis: its rare-utterance WER is the floor of any
    rescoring of these lists (rare-word recall of the oracle is not a ceiling: it minimises errors, not misses)."""
    idx = np.argmin(scored.errors, axis=1)
    errors = np.take_along_axis(scored.errors, idx[:, None], axis=1)[:, 0]
    return tail_stats(scored.refs, [scored.texts[i][int(j)] for i, j in enumerate(idx)], errors, is_rare)


def _tune_mixture(dev: ScoredNBest, a: np.ndarray, b: np.ndarray, lambdas: Sequence[float],
                  config: RescoreConfig) -> tuple[float, TuneResult]:
    best: tuple[float, float, TuneResult] | None = None
    for lam in sorted(lambdas, reverse=True):  # ties go to the larger weight of the first source
        t = tune(dataclasses.replace(dev, lm=lam * a + (1 - lam) * b), config)
        if best is None or t.dev_rescored_wer < best[0] - 1e-12:
            best = (t.dev_rescored_wer, lam, t)
    assert best is not None
    return best[1], best[2]


def compare(
    dev_utts: Sequence[NBestUtterance],
    tests: dict[str, Sequence[NBestUtterance]],
    sources: Sequence[LMSource],
    is_rare: Callable[[str], bool],
    config: RescoreConfig | None = None,
    interpolate: tuple[str, str] | None = None,
    lambdas: Sequence[float] = DEFAULT_LAMBDA_GRID,
    pairs: Sequence[tuple[str, str]] = (),
    vocab: frozenset[str] | None = None,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> Comparison:
    """Tune each source on dev, evaluate it on every test set; `pairs` are (A, B) system names to test B against A."""
    config = config or RescoreConfig()
    if not sources:
        raise ConfigError("compare needs at least one LM source")
    names = [s.name for s in sources]
    if interpolate and not set(interpolate) <= set(names):
        raise ConfigError(f"cannot interpolate {interpolate}: the sources are {names}")
    zero = _ZeroScorer()
    dev = score_nbest(dev_utts, zero, config.batch_size)
    scored = {name: score_nbest(u, zero, config.batch_size) for name, u in tests.items()}
    users = {k: utterance_users(v.utt_ids) for k, v in scored.items()}  # per set, for the user-level bootstrap
    dev_lm = {s.name: lm_matrix(dev, s.scorer, config.batch_size) for s in sources}
    test_lm = {s.name: {k: lm_matrix(v, s.scorer, config.batch_size) for k, v in scored.items()} for s in sources}

    systems = [SystemResult(FIRST_PASS, "-", dev_wer=float(dev.errors[:, 0].sum() / dev.total_ref_words))]
    for k, v in scored.items():
        systems[0].sets[k] = _set_result(v, np.zeros(len(v.utt_ids), dtype=np.int64), is_rare, resamples, seed,
                                         users[k])
    main_tuned = None
    plans: list[tuple[str, str, float | None, dict[str, np.ndarray], TuneResult, dict[str, np.ndarray]]] = []
    for s in sources:
        t = tune(dataclasses.replace(dev, lm=dev_lm[s.name]), config)
        main_tuned = main_tuned or t
        plans.append((s.name, s.privacy, None, test_lm[s.name], t, {}))
    if interpolate:
        a, b = interpolate
        lam, t = _tune_mixture(dev, dev_lm[a], dev_lm[b], lambdas, config)
        mixed = {k: lam * test_lm[a][k] + (1 - lam) * test_lm[b][k] for k in scored}
        priv = "NON-PRIVATE" if any("NON-PRIVATE" in s.privacy for s in sources if s.name in interpolate) else \
            " + ".join(s.privacy for s in sources if s.name in interpolate)
        plans.append((f"{a} + {b} (log-linear)", priv, lam, mixed, t, {}))
    for name, privacy, lam, lms, t, _ in plans:
        sr = SystemResult(name, privacy, t.alpha, t.beta, lam, t.dev_rescored_wer)
        for k, v in scored.items():
            idx = select(dataclasses.replace(v, lm=lms[k]), t.alpha, t.beta)
            sr.sets[k] = _set_result(v, idx, is_rare, resamples, seed, users[k])
            if lam is None:  # diagnostic only: how far dev tuning is from the best weights for this very test set
                sr.sets[k].test_tuned_wer = tune(dataclasses.replace(v, lm=lms[k]), config).dev_rescored_wer
            else:
                a, b = interpolate or ("", "")
                sr.sets[k].test_tuned_wer = _tune_mixture(v, test_lm[a][k], test_lm[b][k], lambdas,
                                                          config)[1].dev_rescored_wer
        systems.append(sr)

    by_name = {s.name: s for s in systems}
    pairwise = []
    for a_name, b_name in pairs:
        if a_name not in by_name or b_name not in by_name:
            raise ConfigError(f"cannot compare {a_name!r} with {b_name!r}: systems are {list(by_name)}")
        for k, v in scored.items():
            ea, eb = by_name[a_name].sets[k].errors, by_name[b_name].sets[k].errors
            pairwise.append({"test_set": k, "a": a_name, "b": b_name,
                             "bootstrap": paired_bootstrap(ea, eb, v.ref_words, resamples, seed=seed),
                             "bootstrap_users": None if users[k] is None else cluster_paired_bootstrap(
                                 ea, eb, v.ref_words, users[k], resamples, seed=seed),
                             "permutation": permutation_test(ea, eb, resamples, seed=seed)})
    oov: dict[str, dict[str, float]] = {}
    if vocab is not None:
        norm = sources[0].scorer.normalize
        for k, v in {"dev": dev, **scored}.items():
            h_oov, h_tot = oov_rate((norm(t) for row in v.texts for t in row), vocab)
            r_oov, r_tot = oov_rate((norm(r) for r in v.refs), vocab)
            oov[k] = {"nbest_hyp_oov_rate": h_oov / max(h_tot, 1), "ref_oov_rate": r_oov / max(r_tot, 1)}
    return Comparison(
        systems=systems, test_sets=list(scored), pairwise=pairwise, oov=oov, main_tuned=main_tuned,
        oracle_wer={k: float(v.errors.min(axis=1).sum() / v.total_ref_words) for k, v in scored.items()},
        ref_words={k: v.total_ref_words for k, v in scored.items()},
        utterances={k: len(v.utt_ids) for k, v in scored.items()},
        main_scored={k: dataclasses.replace(v, lm=test_lm[sources[0].name][k]) for k, v in scored.items()},
        rare_coverage={k: nbest_rare_coverage(v.refs, v.texts, is_rare) for k, v in scored.items()},
        oracle_tail={k: _oracle_tail(v, is_rare) for k, v in scored.items()},
        users={k: len(set(u)) for k, u in users.items() if u is not None},
    )
