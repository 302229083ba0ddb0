"""Assign sentences to users (natural ids or seeded synthetic users), filter/cap them, and split users disjointly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from pflm.errors import ConfigError, DataError

SPLITS = ("train", "val", "test")
SCHEMES = ("natural", "iid", "dirichlet")


@dataclass(frozen=True)
class PartitionConfig:
    """How sentences become users and users become splits.

    scheme: `natural` uses the data's user column; `iid` deals shuffled sentences round-robin to `num_users`
    equal-sized users; `dirichlet` draws user shares from Dirichlet(alpha) (small alpha -> heavy-tailed,
    power-law-like user sizes). min_sentences: users with fewer sentences are dropped. max_sentences: users
    with more are capped to a seeded random subset. split: fractions of *users* in train/val/test.
    """

    scheme: str = "natural"
    num_users: int | None = None
    alpha: float = 0.5
    min_sentences: int = 1
    max_sentences: int | None = None
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"partition scheme {self.scheme!r} unknown; use one of {', '.join(SCHEMES)}")
        if self.scheme != "natural" and (self.num_users is None or self.num_users < 1):
            raise ConfigError(f"partition {self.scheme!r} needs num_users >= 1; pass --num-users N")
        if not self.alpha > 0:
            raise ConfigError(f"alpha must be > 0, got {self.alpha}; pass e.g. --alpha 0.5")
        if self.min_sentences < 1:
            raise ConfigError(f"min_sentences must be >= 1, got {self.min_sentences}")
        if self.max_sentences is not None and self.max_sentences < self.min_sentences:
            raise ConfigError(
                f"max_sentences ({self.max_sentences}) < min_sentences ({self.min_sentences}); raise --max-sentences"
            )
        split = tuple(float(x) for x in self.split)
        if len(split) != 3 or any(not x > 0 for x in split) or abs(sum(split) - 1.0) > 1e-6:
            raise ConfigError(f"split must be three positive fractions summing to 1 (e.g. 0.8,0.1,0.1), got {split}")
        object.__setattr__(self, "split", split)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme, "num_users": self.num_users, "alpha": self.alpha,
            "min_sentences": self.min_sentences, "max_sentences": self.max_sentences,
            "split": list(self.split), "seed": self.seed,
        }


@dataclass
class SplitRows:
    """Rows of one split, grouped by user in sorted user order (original order inside a user)."""

    users: list[str]
    counts: np.ndarray  # int64 [num_users] sentences per user, aligned with `users`
    rows: np.ndarray  # int64 [sum(counts)] indices into the input rows


@dataclass
class Partition:
    splits: dict[str, SplitRows]
    stats: dict[str, int] = field(default_factory=dict)


def _assign(n: int, users: Sequence[Any] | None, cfg: PartitionConfig, rng: np.random.Generator
            ) -> tuple[np.ndarray, list[str], int]:
    """Return (user code per row, -1 = no user; names by code in sorted order; rows without a user id)."""
    if cfg.scheme == "natural":
        if users is None:
            raise ConfigError("partition 'natural' needs a user column; pass --user-column or use --partition iid")
        missing = np.array([u is None or u == "" for u in users], dtype=bool)
        ids = np.array(["" if u is None else str(u) for u in users], dtype=object)
        names, codes = np.unique(ids[~missing].astype(str), return_inverse=True)
        full = np.full(n, -1, dtype=np.int64)
        full[~missing] = codes
        return full, [str(x) for x in names], int(missing.sum())
    k = int(cfg.num_users)  # type: ignore[arg-type]
    if k > n:
        raise DataError(f"--num-users {k} exceeds the {n} sentences available; lower --num-users")
    perm = rng.permutation(n)
    codes = np.empty(n, dtype=np.int64)
    if cfg.scheme == "iid":
        codes[perm] = np.arange(n) % k
    else:
        sizes = rng.multinomial(n, rng.dirichlet(np.full(k, cfg.alpha)))
        codes[perm] = np.repeat(np.arange(k), sizes)
    width = len(str(k - 1))
    return codes, [f"user{i:0{width}d}" for i in range(k)], 0


def _split_sizes(n_users: int, fractions: tuple[float, float, float]) -> list[int]:
    """Largest-remainder rounding of n_users * fractions."""
    raw = [n_users * f for f in fractions]
    sizes = [int(np.floor(r)) for r in raw]
    for i in sorted(range(3), key=lambda i: raw[i] - sizes[i], reverse=True)[: n_users - sum(sizes)]:
        sizes[i] += 1
    return sizes


def partition(users: Sequence[Any] | None, n_rows: int, cfg: PartitionConfig) -> Partition:
    """Partition `n_rows` sentences (with optional per-row user ids) into user-disjoint train/val/test splits."""
    rng = np.random.default_rng(cfg.seed)
    if n_rows == 0:
        raise DataError("no sentences left after normalisation; check --text-column and the input text")
    codes, names, no_user = _assign(n_rows, users, cfg, rng)
    valid = codes >= 0
    counts = np.bincount(codes[valid], minlength=len(names))
    keep_user = counts >= cfg.min_sentences
    stats = {"rows_without_user": no_user, "users_below_min": int(((counts > 0) & ~keep_user).sum())}
    row_ok = valid.copy()
    row_ok[valid] = keep_user[codes[valid]]
    idx = np.flatnonzero(row_ok)
    if cfg.max_sentences is not None and idx.size:
        # Random rank within user: sort by (user, random key); keep the first max_sentences of each user.
        key = rng.random(idx.size)
        order = np.lexsort((key, codes[idx]))
        sorted_codes = codes[idx][order]
        starts = np.r_[0, np.flatnonzero(np.diff(sorted_codes)) + 1]
        group_start = np.repeat(starts, np.diff(np.r_[starts, sorted_codes.size]))
        rank = np.arange(sorted_codes.size) - group_start
        kept = np.sort(idx[order][rank < cfg.max_sentences])
        stats["sentences_over_max"] = int(idx.size - kept.size)
        idx = kept
    present = np.flatnonzero(np.bincount(codes[idx], minlength=len(names)) > 0) if idx.size else np.array([], int)
    if present.size == 0:
        raise DataError(
            f"no user has >= {cfg.min_sentences} sentences; lower --min-sentences or give more data per user"
        )
    sizes = _split_sizes(present.size, cfg.split)
    for name, size in zip(SPLITS, sizes):
        if size == 0:
            raise DataError(
                f"split {name!r} has zero users ({present.size} users in total after filtering); use more users, "
                "lower --min-sentences, or change --split"
            )
    shuffled = rng.permutation(present)
    which = np.full(len(names), -1, dtype=np.int64)
    bounds = np.cumsum([0] + sizes)
    for s in range(3):
        which[shuffled[bounds[s]:bounds[s + 1]]] = s
    row_split = which[codes[idx]]
    splits: dict[str, SplitRows] = {}
    for s, name in enumerate(SPLITS):
        rows = idx[row_split == s]
        rows = rows[np.argsort(codes[rows], kind="stable")]  # grouped by user (codes follow sorted names)
        user_codes, ucounts = np.unique(codes[rows], return_counts=True)
        splits[name] = SplitRows(users=[names[c] for c in user_codes], counts=ucounts.astype(np.int64), rows=rows)
    stats["users_kept"] = int(present.size)
    return Partition(splits=splits, stats=stats)
