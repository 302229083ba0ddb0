"""N-best rescoring with a neural LM: combine first-pass and LM scores, tune alpha/beta on dev only, report test WER.

Combined score of a hypothesis (higher is better):

    total = base + alpha * lm_logprob + beta * num_words

`base` is the first-pass `score`; when *every* hypothesis of an utterance carries `am_score`, `base` is that acoustic
score instead, i.e. the new LM replaces the first-pass LM (the usual second-pass setup when scores are split). The
first-pass WER always uses the best `score` regardless. `lm_logprob` is the scorer's natural-log sentence probability
(with sentence start/end) of the normalized hypothesis; `num_words` counts the hypothesis' whitespace-separated words.

Tuning (`tune`) receives only the scored dev set; the test set is read and scored only after alpha/beta are fixed.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from pflm.errors import ConfigError, DataError
from pflm.evaluation.nbest import NBestUtterance, read_nbest
from pflm.evaluation.wer import errors_batch, wer_from_counts


class SentenceScorer(Protocol):
    """What rescoring needs from a trained LM (implemented in `pflm.evaluation.lm_scorer`)."""

    def normalize(self, text: str) -> str:
        """The training-time text normalization."""
        ...

    def score(self, texts: list[str]) -> list[float]:
        """Natural-log probability of each normalized sentence including <s> ... </s>, batched."""
        ...


# pocketsphinx's first-pass scores differ by ~0.01-0.1 nats between competing hypotheses while LM log-probs differ
# by several nats, so alpha is searched on a log scale over five decades (plus 0 = first pass only).
DEFAULT_ALPHA_GRID: tuple[float, ...] = (0.0,) + tuple(float(x) for x in np.round(np.logspace(-4, 1, 51), 8))
# By default beta is searched relative to alpha (beta = alpha * g): a per-word bonus of g nats on the LM's scale,
# which keeps the word-count term commensurate with the LM term at every alpha.
DEFAULT_BETA_PER_ALPHA: tuple[float, ...] = tuple(float(x) for x in np.round(np.linspace(-5, 5, 21), 6))


@dataclass
class RescoreConfig:
    """Grid and batching for rescoring. `beta_grid` (absolute betas) overrides the alpha-relative default."""

    alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID
    beta_grid: tuple[float, ...] | None = None
    beta_per_alpha: tuple[float, ...] = DEFAULT_BETA_PER_ALPHA
    batch_size: int = 256
    # > 0: choose alpha by the dev WER averaged over its `smooth` neighbours on each side of the (sorted, nonzero)
    # alpha grid — a flat minimum rather than a lucky grid point; beta is then the best at that alpha
    smooth: int = 0

    def __post_init__(self) -> None:
        self.alpha_grid = tuple(float(a) for a in self.alpha_grid)
        if not self.alpha_grid or any(not math.isfinite(a) or a < 0 for a in self.alpha_grid):
            raise ConfigError("alpha_grid must be a non-empty list of finite values >= 0; e.g. --alpha-grid 0:2:0.05")
        for name in ("beta_grid", "beta_per_alpha"):
            grid = getattr(self, name)
            if grid is None:
                continue
            grid = tuple(float(b) for b in grid)
            setattr(self, name, grid)
            if not grid or any(not math.isfinite(b) for b in grid):
                raise ConfigError(f"{name} must be a non-empty list of finite numbers; e.g. --beta-grid -5:5:0.5")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size={self.batch_size} must be >= 1; use e.g. 256")
        if self.smooth < 0:
            raise ConfigError(f"smooth={self.smooth} must be >= 0 (0 = plain grid minimum); use e.g. 2")

    def pairs(self) -> list[tuple[float, float]]:
        """All (alpha, beta) candidates, deduplicated, in grid order."""
        out: dict[tuple[float, float], None] = {}
        for a in self.alpha_grid:
            betas = self.beta_grid if self.beta_grid is not None else tuple(a * g for g in self.beta_per_alpha)
            for b in betas:
                out[(a, round(b, 12) + 0.0)] = None  # + 0.0 turns -0.0 into 0.0
        return list(out)


@dataclass
class ScoredNBest:
    """An N-best set with LM scores and per-hypothesis word errors, padded to arrays [utterances, max_hyps].

    Hypotheses are sorted by first-pass score (best first), so column 0 is the first-pass choice and ties in the
    combined score go to the better first-pass hypothesis.
    """

    utt_ids: list[str]
    refs: list[str]
    texts: list[list[str]]
    base: np.ndarray  # combination base (score or am_score); -inf in padding
    first_pass: np.ndarray  # first-pass score; -inf in padding
    lm: np.ndarray  # LM natural-log probability; 0 in padding
    words: np.ndarray  # hypothesis word counts; 0 in padding
    errors: np.ndarray  # word errors against the reference; large in padding
    ref_words: np.ndarray  # [utterances]

    @property
    def total_ref_words(self) -> int:
        return int(self.ref_words.sum())


def _check_scores(texts: list[str], scores: Sequence[float]) -> list[float]:
    if len(scores) != len(texts):
        raise DataError(f"LM scorer returned {len(scores)} scores for {len(texts)} sentences; it must return one each")
    out = []
    for t, s in zip(texts, scores):
        s = float(s)
        if not math.isfinite(s):
            raise DataError(f"LM scorer gave a non-finite log-probability ({s}) for {t!r}; map unknown words to <unk>")
        out.append(s)
    return out


def lm_scores(scorer: SentenceScorer, texts: Sequence[str], batch_size: int = 256) -> dict[str, float]:
    """Score each distinct normalized text once, in batches of similar length; returns text -> log-prob."""
    unique = sorted(set(texts), key=lambda t: (len(t.split()), t))
    result: dict[str, float] = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i : i + batch_size]
        result.update(zip(chunk, _check_scores(chunk, scorer.score(chunk))))
    return result


def score_nbest(utts: Sequence[NBestUtterance], scorer: SentenceScorer, batch_size: int = 256) -> ScoredNBest:
    """LM-score every hypothesis (each distinct normalized text once) and count its word errors."""
    if not utts:
        raise DataError("the N-best set is empty; nothing to rescore")
    ordered = [sorted(u.nbest, key=lambda h: -h.score) for u in utts]
    norm_cache: dict[str, str] = {}
    for hyps in ordered:
        for h in hyps:
            if h.text not in norm_cache:
                norm_cache[h.text] = scorer.normalize(h.text)
    logp = lm_scores(scorer, list(norm_cache.values()), batch_size)

    n_utt, width = len(utts), max(len(h) for h in ordered)
    base = np.full((n_utt, width), -np.inf)
    first = np.full((n_utt, width), -np.inf)
    lm = np.zeros((n_utt, width))
    words = np.zeros((n_utt, width))
    errors = np.full((n_utt, width), np.iinfo(np.int32).max // 4, dtype=np.int64)
    pair_refs = [u.ref for u, hyps in zip(utts, ordered) for _ in hyps]
    pair_hyps = [h.text for hyps in ordered for h in hyps]
    counts = iter(errors_batch(pair_refs, pair_hyps))
    ref_words = np.zeros(n_utt, dtype=np.int64)
    for i, hyps in enumerate(ordered):
        use_am = all(h.am_score is not None for h in hyps)
        for j, h in enumerate(hyps):
            base[i, j] = h.am_score if use_am else h.score
            first[i, j] = h.score
            lm[i, j] = logp[norm_cache[h.text]]
            words[i, j] = len(h.text.split())
            errors[i, j], ref_words[i] = next(counts)
    return ScoredNBest(
        utt_ids=[u.utt_id for u in utts],
        refs=[u.ref for u in utts],
        texts=[[h.text for h in hyps] for hyps in ordered],
        base=base,
        first_pass=first,
        lm=lm,
        words=words,
        errors=errors,
        ref_words=ref_words,
    )


def select(scored: ScoredNBest, alpha: float, beta: float) -> np.ndarray:
    """Index of the best hypothesis per utterance under the combined score."""
    return np.argmax(scored.base + alpha * scored.lm + beta * scored.words, axis=1)


def _errors_at(scored: ScoredNBest, idx: np.ndarray) -> np.ndarray:
    return np.take_along_axis(scored.errors, idx[:, None], axis=1)[:, 0]


@dataclass
class TuneResult:
    """Chosen alpha/beta and the dev-set WERs behind the choice."""

    alpha: float
    beta: float
    dev_utterances: int
    dev_ref_words: int
    dev_first_pass_wer: float
    dev_rescored_wer: float
    dev_oracle_wer: float
    grid: list[tuple[float, float, float]] = field(default_factory=list)  # (alpha, beta, dev WER)


def _smoothed_choice(results: list[tuple[int, float, float]], k: int) -> tuple[int, float, float]:
    """(errors, alpha, beta): alpha minimising the mean of its best-beta dev errors over +-k nonzero grid neighbours
    (alpha = 0 is judged on its own errors); ties go to the smaller alpha; then the best beta at that alpha."""
    best_at: dict[float, tuple[int, float, float]] = {}
    for r in results:
        if r[1] not in best_at or (r[0], abs(r[2])) < (best_at[r[1]][0], abs(best_at[r[1]][2])):
            best_at[r[1]] = r
    alphas = sorted(best_at)
    nonzero = [a for a in alphas if a > 0]
    score = {0.0: float(best_at[0.0][0])} if 0.0 in best_at else {}
    for i, a in enumerate(nonzero):
        window = nonzero[max(0, i - k) : i + k + 1]
        score[a] = sum(best_at[w][0] for w in window) / len(window)
    alpha = min(alphas, key=lambda a: (score[a], a))
    return best_at[alpha]


def tune(dev: ScoredNBest, config: RescoreConfig | None = None) -> TuneResult:
    """Grid-search alpha, beta minimizing dev corpus WER; ties go to smaller |alpha|, then smaller |beta|
    (`config.smooth` > 0: alpha minimising the neighbour-averaged dev WER instead, see `_smoothed_choice`).

    Only the dev set is an input: nothing here can see the test set.
    """
    config = config or RescoreConfig()
    by_alpha: dict[float, list[float]] = {}
    for a, b in config.pairs():
        by_alpha.setdefault(a, []).append(b)
    results: list[tuple[int, float, float]] = []
    for a, betas in by_alpha.items():
        bs = np.asarray(betas)[:, None, None]
        totals = dev.base[None] + a * dev.lm[None] + bs * dev.words[None]  # [B, U, N]
        idx = np.argmax(totals, axis=2)
        errs = np.take_along_axis(np.broadcast_to(dev.errors, totals.shape), idx[..., None], axis=2)[..., 0]
        results.extend((int(e), a, b) for e, b in zip(errs.sum(axis=1), betas))
    best_err, alpha, beta = min(results, key=lambda r: (r[0], abs(r[1]), abs(r[2])))
    if config.smooth:
        best_err, alpha, beta = _smoothed_choice(results, config.smooth)
    words = dev.total_ref_words
    first_err = int(dev.errors[:, 0].sum())
    oracle_err = int(dev.errors.min(axis=1).sum())
    return TuneResult(
        alpha=alpha,
        beta=beta,
        dev_utterances=len(dev.utt_ids),
        dev_ref_words=words,
        dev_first_pass_wer=wer_from_counts(first_err, words),
        dev_rescored_wer=wer_from_counts(best_err, words),
        dev_oracle_wer=wer_from_counts(oracle_err, words),
        grid=[(a, b, wer_from_counts(e, words)) for e, a, b in results],
    )


@dataclass
class EvalResult:
    """Test-set WERs at fixed alpha/beta, with one row per utterance."""

    alpha: float
    beta: float
    utterances: int
    ref_words: int
    first_pass_wer: float
    rescored_wer: float
    oracle_wer: float
    relative_reduction: float  # (first_pass - rescored) / first_pass
    rows: list[dict[str, Any]]


def evaluate(scored: ScoredNBest, alpha: float, beta: float) -> EvalResult:
    """Apply fixed alpha/beta to a scored set and compute first-pass, rescored and oracle WER."""
    idx = select(scored, alpha, beta)
    oracle_idx = np.argmin(scored.errors, axis=1)
    first_e, resc_e, orac_e = scored.errors[:, 0], _errors_at(scored, idx), _errors_at(scored, oracle_idx)
    words = scored.total_ref_words
    first, resc = wer_from_counts(int(first_e.sum()), words), wer_from_counts(int(resc_e.sum()), words)
    rows = []
    for i, utt in enumerate(scored.utt_ids):
        j, k = int(idx[i]), int(oracle_idx[i])
        rows.append(
            {
                "utt_id": utt,
                "ref": scored.refs[i],
                "ref_words": int(scored.ref_words[i]),
                "first_pass": scored.texts[i][0],
                "first_pass_errors": int(first_e[i]),
                "rescored": scored.texts[i][j],
                "rescored_errors": int(resc_e[i]),
                "rescored_rank": j,
                "oracle": scored.texts[i][k],
                "oracle_errors": int(orac_e[i]),
                "lm_logprob_first_pass": float(scored.lm[i, 0]),
                "lm_logprob_rescored": float(scored.lm[i, j]),
            }
        )
    return EvalResult(
        alpha=alpha,
        beta=beta,
        utterances=len(scored.utt_ids),
        ref_words=words,
        first_pass_wer=first,
        rescored_wer=resc,
        oracle_wer=wer_from_counts(int(orac_e.sum()), words),
        relative_reduction=(first - resc) / first if first > 0 else 0.0,
        rows=rows,
    )


@dataclass
class RescoreReport:
    tuned: TuneResult
    test: EvalResult


def rescore_files(
    dev_path: str | os.PathLike,
    test_path: str | os.PathLike,
    scorer: SentenceScorer,
    config: RescoreConfig | None = None,
) -> RescoreReport:
    """Tune on the dev file, then (and only then) read and score the test file with the chosen alpha/beta."""
    config = config or RescoreConfig()
    dev = score_nbest(read_nbest(dev_path), scorer, config.batch_size)
    tuned = tune(dev, config)
    test = score_nbest(read_nbest(test_path), scorer, config.batch_size)
    return RescoreReport(tuned=tuned, test=evaluate(test, tuned.alpha, tuned.beta))
