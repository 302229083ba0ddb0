"""Several released LMs scored as one (mean sentence log-probability), with the privacy of the pair composed.

Every member is a release about the same users, so the ensemble's ε is the composition of all members' releases
(their accountant histories concatenated and accounted together), never one member's ε: two runs at ε = 2 each
are an ensemble at ε ≈ 2.16 (RDP), and two runs calibrated for 2 × rounds are an ensemble at ε = 2. Members
trained on different users would compose to less (parallel composition); this module does not assume it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from pflm.epsilon import epsilon_from_history
from pflm.errors import ConfigError
from pflm.model.pretrained import is_public_pretrain

# Normalisation probes: members whose normalisers disagree on any of them would score different sentences.
_PROBES = ("Hello, World!  It's 3 o'clock.", "ÉCOLE naïve — café", "don't  stop\tme now")


class EnsembleScorer:
    """Sentence score = mean of the members' natural-log sentence probabilities (a geometric mean of the
    members' sentence distributions, unnormalised; α/β tuning absorbs the scale). Members may have different
    vocabularies (each scores its own OOV words); they must normalise text identically."""

    def __init__(self, members: Sequence[Any], names: Sequence[str] | None = None) -> None:
        if len(members) < 2:
            raise ConfigError("an ensemble needs at least two LMs; pass one more run with --ensemble RUN_DIR")
        self.members = list(members)
        self.names = list(names) if names is not None else [f"member{i}" for i in range(len(members))]
        ref = [self.members[0].normalize(p) for p in _PROBES]
        for name, m in zip(self.names[1:], self.members[1:]):
            if [m.normalize(p) for p in _PROBES] != ref:
                raise ConfigError(f"ensemble member {name} normalises text differently from {self.names[0]}; "
                                  "ensemble runs prepared with the same `pflm prepare` normalisation")
        vocabs = [getattr(m, "vocab", None) for m in self.members]
        # A word is OOV for the ensemble only if no member has it (subword members have no OOV words).
        self.vocab = None if any(v is None for v in vocabs) else frozenset().union(*vocabs)

    def normalize(self, text: str) -> str:
        return self.members[0].normalize(text)

    def score(self, texts: list[str]) -> list[float]:
        scores = [m.score(texts) for m in self.members]
        k = len(scores)
        return [sum(col) / k for col in zip(*scores)]


def run_history(run_dir: Path) -> tuple[list[tuple[float, float, int]], float, str] | None:
    """(accountant history, δ, accountant) of a DP run's releases from its summary.json; None if the run is
    not private; an empty history for a `pflm pretrain` output (public text only). Runs written before summaries carried `accountant_history` are accepted only when one
    (σ, q, rounds) entry reproduces their printed ε (no adaptive clipping, no DP vocabulary, no redone rounds)."""
    path = run_dir / "summary.json"
    if not path.is_file() and is_public_pretrain(run_dir):  # a `pflm pretrain` output: no release about users
        return [], 0.0, ""
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no summary.json; an ensemble composes the privacy of `pflm train` runs "
                          "(and `pflm pretrain` outputs, which are public)")
    s = json.loads(path.read_text(encoding="utf-8"))
    if not s.get("noise_multiplier") or s.get("epsilon") is None:
        return None
    priv = s.get("recipe", {}).get("privacy", {})
    if priv.get("mechanism", "gaussian") != "gaussian" or "dp" in (s.get("vocabulary_source"), s.get("prior_source")):
        raise ConfigError(f"{run_dir} uses a DP vocabulary/prior or the {priv.get('mechanism')} mechanism; the ensemble "
                          "composes central-Gaussian runs only: compose its privacy by hand (`pflm privacy epsilon`)")
    delta, accountant, eps = float(s["delta"]), str(s.get("accountant", "rdp")), float(s["epsilon"])
    hist = s.get("accountant_history")
    if hist is not None:
        history = [(float(a), float(b), int(c)) for a, b, c in hist]
    elif priv.get("adaptive_clipping", {}).get("enabled"):
        raise ConfigError(f"{run_dir} used adaptive clipping and predates summary.json's accountant_history; "
                          "compose its privacy by hand (`pflm privacy epsilon`)")
    else:
        history = [(float(s["noise_multiplier"]), float(s["sampling_rate"]), int(s["rounds"]))]
    # A history that yields less than the printed ε is not the run's (e.g. redone rounds after a resume).
    check = epsilon_from_history(history, delta, accountant)
    if not math.isclose(check, eps, rel_tol=1e-6, abs_tol=1e-9) and check < eps:
        raise ConfigError(f"{run_dir}: its releases (σ, q, rounds) do not reproduce its printed ε={eps:.4g}; compose "
                          "its privacy by hand (`pflm privacy epsilon`) instead of ensembling it")
    return history, delta, accountant


def ensemble_privacy_label(run_dirs: Sequence[str | Path]) -> str:
    """'DP eps=.. delta=.. (N runs composed[ + M public])' for the members' releases together (public pretrained
    members add none), or 'NON-PRIVATE …' if any member has no noise (the ensemble releases that member too)."""
    parts = [run_history(Path(d)) for d in run_dirs]
    if any(p is None for p in parts):
        return "NON-PRIVATE (a member has no noise)"
    public = sum(1 for p in parts if p is not None and not p[0])
    parts = [p for p in parts if p is not None and p[0]]  # public members add no release
    if not parts:
        return "PUBLIC data only (no user data, eps=0)"
    deltas = {p[1] for p in parts}
    accountants = {p[2] for p in parts}
    if len(accountants) != 1:
        raise ConfigError(f"ensemble members use different accountants ({', '.join(sorted(accountants))}); "
                          "retrain them with one privacy.accountant")
    # Each member is (ε_i, δ_i)-DP; composing the RDP curves at the largest member δ gives one (ε, δ) pair.
    delta = max(deltas)
    history = [h for p in parts for h in p[0]]
    eps = epsilon_from_history(history, delta, accountants.pop())
    extra = f" + {public} public" if public else ""
    return f"DP eps={eps:.2f} delta={delta:g} ({len(parts)} runs composed{extra})"
