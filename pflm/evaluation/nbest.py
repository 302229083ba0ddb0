"""The N-best list file format (JSON Lines) shared by recognizer output, rescoring and WER tools, with strict checks."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from pflm.errors import DataError
from pflm.io_utils import atomic_write_text

# One line per utterance:
#   {"utt_id": str, "ref": str, "nbest": [{"text": str, "score": float, "am_score"?: float, "lm_score"?: float}, ...]}
# `score` is the first-pass log-score (higher is better). Unknown extra keys are ignored (forward compatible).

_EXAMPLE = '{"utt_id": "u1", "ref": "hi there", "nbest": [{"text": "hi there", "score": -3.2}]}'


@dataclass(frozen=True)
class Hypothesis:
    """One recognizer hypothesis: its words and first-pass log-scores (higher is better)."""

    text: str
    score: float
    am_score: float | None = None
    lm_score: float | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.text, "score": self.score}
        if self.am_score is not None:
            out["am_score"] = self.am_score
        if self.lm_score is not None:
            out["lm_score"] = self.lm_score
        return out


@dataclass(frozen=True)
class NBestUtterance:
    """One utterance: its id, reference transcript and non-empty list of hypotheses."""

    utt_id: str
    ref: str
    nbest: tuple[Hypothesis, ...]

    def to_json(self) -> dict[str, Any]:
        return {"utt_id": self.utt_id, "ref": self.ref, "nbest": [h.to_json() for h in self.nbest]}


def _number(value: Any, what: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(
            f"{where}: {what} must be a number, got {json.dumps(value)[:40]}; "
            "write the log-score as a JSON number, e.g. -12.5"
        )
    value = float(value)
    if not math.isfinite(value):
        raise DataError(f"{where}: {what} is {value}; write a finite log-score (floor very unlikely ones, e.g. -1e4)")
    return value


def _reject_constant(name: str) -> float:
    # json.loads accepts NaN/Infinity by default; they are not valid JSON and would poison the grid search.
    raise ValueError(f"{name} is not allowed (not valid JSON)")


def parse_nbest_line(line: str, path: str | os.PathLike, lineno: int) -> NBestUtterance:
    """Parse and validate one JSONL line; errors name the file and 1-based line number and say how to fix it."""
    where = f"N-best file {path} line {lineno}"
    try:
        obj = json.loads(line, parse_constant=_reject_constant)
    except ValueError as e:
        raise DataError(f"{where}: bad JSON ({e}); each line must be one JSON object like {_EXAMPLE}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}; use {_EXAMPLE}")
    for key in ("utt_id", "ref", "nbest"):
        if key not in obj:
            raise DataError(f"{where}: missing field '{key}'; each line needs utt_id, ref and nbest, e.g. {_EXAMPLE}")
    utt_id, ref, nbest = obj["utt_id"], obj["ref"], obj["nbest"]
    if not isinstance(utt_id, str) or not utt_id:
        raise DataError(f"{where}: 'utt_id' must be a non-empty string; give each utterance a unique id")
    if not isinstance(ref, str):
        raise DataError(f"{where}: 'ref' must be a string (the reference transcript); use \"\" for silence")
    if not isinstance(nbest, list):
        raise DataError(f"{where}: 'nbest' must be a list of hypotheses, got {type(nbest).__name__}")
    if not nbest:
        raise DataError(f"{where}: 'nbest' is empty; give at least one hypothesis (use text \"\" for an empty decode)")
    hyps = []
    for i, h in enumerate(nbest, start=1):
        hw = f"{where}, hypothesis {i}"
        if not isinstance(h, dict):
            raise DataError(f"{hw}: expected an object like {{\"text\": \"hi\", \"score\": -3.2}}")
        for key in ("text", "score"):
            if key not in h:
                raise DataError(f"{hw}: missing field '{key}'; each hypothesis needs text and score")
        if not isinstance(h["text"], str):
            raise DataError(f"{hw}: 'text' must be a string")
        extra = {}
        for key in ("am_score", "lm_score"):
            if h.get(key) is not None:
                extra[key] = _number(h[key], f"'{key}'", hw)
        hyps.append(Hypothesis(text=h["text"], score=_number(h["score"], "'score'", hw), **extra))
    return NBestUtterance(utt_id=utt_id, ref=ref, nbest=tuple(hyps))


def iter_nbest(path: str | os.PathLike) -> Iterator[NBestUtterance]:
    """Yield validated utterances from a JSONL N-best file (blank lines are skipped; utt_ids must be unique)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"N-best file {path} not found; create it with `pflm nbest ... --out {path}`")
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            utt = parse_nbest_line(line, path, lineno)
            if utt.utt_id in seen:
                raise DataError(
                    f"N-best file {path} line {lineno}: duplicate utt_id '{utt.utt_id}' (first on line "
                    f"{seen[utt.utt_id]}); make utterance ids unique"
                )
            seen[utt.utt_id] = lineno
            yield utt


def read_nbest(path: str | os.PathLike) -> list[NBestUtterance]:
    """Read a whole N-best file; an empty file is an error."""
    utts = list(iter_nbest(path))
    if not utts:
        raise DataError(f"N-best file {path} has no utterances; regenerate it with `pflm nbest`")
    return utts


def write_nbest(path: str | os.PathLike, utts: Iterable[NBestUtterance]) -> Path:
    """Write utterances as JSONL atomically (the file appears complete or not at all)."""
    lines = [json.dumps(u.to_json(), ensure_ascii=False) for u in utts]
    path = Path(path)
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return path


def _read_keyed_lines(path: Path, what: str) -> list[tuple[int, str, str]]:
    if not path.is_file():
        raise DataError(f"Kaldi {what} file {path} not found")
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            key, _, rest = line.partition(" ")
            rows.append((lineno, key, rest.strip()))
    return rows


def _split_nbest_key(key: str, path: Path, lineno: int) -> tuple[str, int]:
    utt, sep, idx = key.rpartition("-")
    if not sep or not utt or not idx.isdigit():
        raise DataError(f"Kaldi file {path} line {lineno}: key '{key}' is not '<utt_id>-<n>'; use nbest-to-linear keys")
    return utt, int(idx)


def read_kaldi_nbest(
    text_path: str | os.PathLike,
    scores_path: str | os.PathLike,
    refs_path: str | os.PathLike,
    costs: bool = False,
) -> list[NBestUtterance]:
    """Import Kaldi-style N-best text: `<utt>-<n> words...` lines, `<utt>-<n> score` lines and `<utt> ref` lines.

    With `costs=True` the numbers are Kaldi costs (negative log-likelihoods) and are negated into log-scores.
    """
    text_path, scores_path, refs_path = Path(text_path), Path(scores_path), Path(refs_path)
    scores: dict[str, float] = {}
    for lineno, key, rest in _read_keyed_lines(scores_path, "scores"):
        try:
            value = float(rest)
        except ValueError:
            raise DataError(f"Kaldi scores file {scores_path} line {lineno}: '{rest}' is not a number") from None
        value = _number(-value if costs else value, "score", f"Kaldi scores file {scores_path} line {lineno}")
        scores[key] = value
    refs = {key: rest for _, key, rest in _read_keyed_lines(refs_path, "refs")}
    grouped: dict[str, list[tuple[int, Hypothesis]]] = {}
    for lineno, key, rest in _read_keyed_lines(text_path, "text"):
        utt, idx = _split_nbest_key(key, text_path, lineno)
        if key not in scores:
            raise DataError(f"Kaldi text file {text_path} line {lineno}: no score for '{key}' in {scores_path}")
        grouped.setdefault(utt, []).append((idx, Hypothesis(text=rest, score=scores[key])))
    utts = []
    for utt, items in grouped.items():
        if utt not in refs:
            raise DataError(f"Kaldi refs file {refs_path} has no reference for utterance '{utt}'; add '{utt} <words>'")
        items.sort(key=lambda t: t[0])
        utts.append(NBestUtterance(utt_id=utt, ref=refs[utt], nbest=tuple(h for _, h in items)))
    if not utts:
        raise DataError(f"Kaldi text file {text_path} has no hypotheses")
    return utts
