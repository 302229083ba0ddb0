"""The LM sources `pflm rescore` compares: the run's LM, other runs (`--compare`), the NON-PRIVATE n-gram baseline."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from pflm.errors import ConfigError
from pflm.evaluation.compare import LMSource


def privacy_label(run_dir: Path) -> str:
    """What the run's published summary says about its privacy: 'DP eps=.. delta=..' or 'NON-PRIVATE (no noise)'."""
    from pflm.model.pretrained import is_public_pretrain

    path = run_dir / "summary.json"
    if not path.is_file() and is_public_pretrain(run_dir):  # a `pflm pretrain` output: public text only
        return "PUBLIC data only (no user data, eps=0)"
    if (run_dir / "NOT-PRIVATE.txt").is_file():  # e.g. scripts/asr_central_bound.py's central upper bound
        return "NON-PRIVATE (see its NOT-PRIVATE.txt)"
    if not path.is_file():
        return "privacy unknown (no summary.json)"
    s = json.loads(path.read_text())
    eps, sigma = s.get("epsilon"), s.get("noise_multiplier")
    if sigma and eps is not None and math.isfinite(float(eps)):
        return f"DP eps={float(eps):.2f} delta={float(s.get('delta', 0)):g}"
    return "NON-PRIVATE (no noise)"


def run_source(run_dir: str, load: Callable[..., Any], oov_scoring: str) -> LMSource:
    kwargs = {} if oov_scoring == "public" else {"oov_scoring": oov_scoring}
    p = Path(run_dir)
    return LMSource(name=f"LM {p.name}", privacy=privacy_label(p), scorer=load(str(p), **kwargs))


def ensemble_source(run_dirs: list[str], load: Callable[..., Any], oov_scoring: str) -> LMSource:
    """Several runs scored as one LM (mean sentence log-probability); privacy = all members' releases composed."""
    from pflm.evaluation.ensemble import EnsembleScorer, ensemble_privacy_label

    kwargs = {} if oov_scoring == "public" else {"oov_scoring": oov_scoring}
    paths = [Path(d) for d in run_dirs]
    scorer = EnsembleScorer([load(str(p), **kwargs) for p in paths], names=[p.name for p in paths])
    return LMSource(name="LM " + "+".join(p.name for p in paths), privacy=ensemble_privacy_label(paths), scorer=scorer)


def spec_source(spec: str, load: Callable[..., Any], oov_scoring: str) -> LMSource:
    """A run directory, or `RUN_A+RUN_B` (when no directory has that name) for the runs scored as one ensemble."""
    if "+" in spec and not Path(spec).is_dir():
        members = spec.split("+")
        if any(not m for m in members):
            raise ConfigError(f"{spec!r} is not RUN_A+RUN_B: a member is empty; write e.g. runs/a+runs/b")
        return ensemble_source(members, load, oov_scoring)
    return run_source(spec, load, oov_scoring)


def ngram_source(data_dir: str, order: int, vocab: frozenset[str] | None, oov_scoring: str,
                 arpa_out: Path | None = None) -> LMSource:
    """Kneser–Ney on the store's train split (NON-PRIVATE), same vocabulary and OOV scoring as the main LM."""
    from pflm.evaluation.ngram_baseline import PRIVACY_LABEL, NgramScorer, train_ngram_baseline
    from pflm.evaluation.oov_prior import PublicOOVPrior

    if not Path(data_dir, "manifest.json").is_file():
        raise ConfigError(f"--ngram-data {data_dir} is not a `pflm prepare` output (no manifest.json)")
    lm, normalize = train_ngram_baseline(data_dir, order=order, vocab=vocab)
    if arpa_out is not None:
        lm.write_arpa(arpa_out)
    prior = PublicOOVPrior(lm.vocab) if oov_scoring == "public" else None
    return LMSource(name=f"{order}-gram KN", privacy=PRIVACY_LABEL, scorer=NgramScorer(lm, normalize, prior))


def parse_named_paths(specs: list[str] | None, flag: str) -> dict[str, str]:
    """`NAME=PATH` items of a repeatable flag (NAME must be unique and not 'test' or 'dev')."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or name in ("test", "dev") or name in out:
            raise ConfigError(f"{flag} '{spec}' must be NAME=PATH with a new NAME other than test/dev, e.g. awb=test_awb.jsonl")
        out[name] = path
    return out
