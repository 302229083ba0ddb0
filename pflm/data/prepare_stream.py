"""`pflm prepare --stream`: one pass over user-sorted input, user by user, so memory does not grow with the users.

The in-memory path (`pflm.data.prepare.prepare`) holds every sentence, every user id and the partition in RAM: fine
for chitchat, not for a million users. This path reads the input in row batches (Parquet `iter_batches` or JSON
lines), groups consecutive rows of one user, and writes each finished user straight into the three
`StoreWriter`s. What it keeps is bounded by one encode batch (~20k sentences) plus the writers' 65,536-row
buffers, whatever the number of users. The price, stated in the manifest (`partition.assignment`):

- the input must be sorted by the user column (the store is sorted by user; an out-of-order row is a one-line
  `DataError` and nothing is written);
- the vocabulary must be public (`--tokenizer-input wordfreq|FILE`): a vocabulary learned from the users needs
  their text before the first user can be encoded;
- a user's split is a keyed hash of (seed, user id) compared with the split fractions (each user independently,
  so split sizes are binomial around the fractions rather than exact), and a `--max-sentences` cap keeps a
  subset drawn from a generator seeded by the same hash. Both are functions of the public seed and the user id
  only, like the in-memory path's seeded shuffle.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq

from pflm.data.load import _local_files
from pflm.data.normalize import Normalizer
from pflm.data.partition import SPLITS
from pflm.data.store import MANIFEST, TOKEN_COUNTS, StoreWriter
from pflm.data.tokenizer import train_tokenizer
from pflm.errors import ConfigError, DataError
from pflm.io_utils import atomic_directory, atomic_write_json

ENCODE_BATCH = 20_000  # sentences encoded per SentencePiece call
READ_BATCH = 65_536  # rows per Parquet read
WRITE_CHUNK_ROWS = 65_536  # rows per Arrow record batch written (StoreWriter buffer)


def check_stream_config(cfg: Any) -> None:
    """One-line ConfigError for settings the streamed path cannot honour (PrepareConfig calls this)."""
    if cfg.input is None:
        raise ConfigError("--stream reads --input FILE (.jsonl or .parquet sorted by user); embedded --corpus "
                          "datasets are small, drop --stream")
    if cfg.partition.scheme != "natural" or not cfg.user_column:
        raise ConfigError("--stream needs --user-column (natural partition, input sorted by that column)")
    if cfg.vocab_source != "exact" or not cfg.tokenizer.tokenizer_input:
        raise ConfigError("--stream needs a public vocabulary: pass --tokenizer-input wordfreq (or a public text "
                          "file); a vocabulary learned from the users needs all their text first, drop --stream")


def split_unit(seed: int, user: str) -> float:
    """The user's position in [0, 1): a hash of (seed, user id); the split is where it falls in the fractions."""
    h = hashlib.blake2b(f"pflm-split/{int(seed)}/{user}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2.0 ** 64


def split_of(seed: int, user: str, fractions: tuple[float, float, float]) -> str:
    u, edge = split_unit(seed, user), 0.0
    for name, f in zip(SPLITS, fractions):
        edge += f
        if u < edge:
            return name
    return SPLITS[-1]


def cap_rows(seed: int, user: str, n: int, cap: int) -> np.ndarray:
    """Sorted indices of the `cap` sentences kept of a user's `n` (seeded by the same hash as the split)."""
    h = hashlib.blake2b(f"pflm-cap/{int(seed)}/{user}".encode("utf-8"), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(h, "little"))
    return np.sort(rng.permutation(n)[:cap])


def iter_rows(source: str, text_column: str, user_column: str) -> Iterator[tuple[Any, Any]]:
    """(user, text) of every input row in file order, read in bounded batches."""
    builder, files = _local_files(source)
    if builder not in ("json", "parquet"):
        raise DataError(f"{source}: --stream reads .jsonl or .parquet files; convert it or drop --stream")
    for path in files:
        if builder == "parquet":
            try:
                pf = pq.ParquetFile(path)
                names = pf.schema_arrow.names
                for col, flag in ((text_column, "--text-column"), (user_column, "--user-column")):
                    if col not in names:
                        raise DataError(f"{path}: unknown column {col!r} for {flag}; available columns: "
                                        f"{', '.join(names)}")
                for batch in pf.iter_batches(batch_size=READ_BATCH, columns=[user_column, text_column]):
                    yield from zip(batch.column(0).to_pylist(), batch.column(1).to_pylist())
            except OSError as e:
                raise DataError(f"{path}: could not read as parquet: {str(e).splitlines()[0]}") from None
            continue
        with open(path, encoding="utf-8", errors="strict") as f:
            lineno = 0
            try:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{lineno}: not a JSON line ({e.msg}); --stream reads one JSON "
                                        "object per line") from None
                    if not isinstance(row, dict) or text_column not in row:
                        raise DataError(f"{path}:{lineno}: no {text_column!r} field (--text-column)")
                    yield row.get(user_column), row[text_column]
            except UnicodeDecodeError:
                raise DataError(f"{path}: invalid UTF-8 after line {lineno}; re-encode the file as UTF-8 "
                                "(e.g. `iconv -f latin1 -t utf-8`)") from None


def iter_users(rows: Iterator[tuple[Any, Any]], norm: Callable[[str], str], stats: dict[str, int]
               ) -> Iterator[tuple[str, list[str]]]:
    """Group consecutive rows by user: (user, normalised non-empty texts); DataError if users are not sorted."""
    user: str | None = None
    texts: list[str] = []
    for raw_user, raw_text in rows:
        stats["raw_rows"] += 1
        if raw_user is None or raw_user == "":
            stats["rows_without_user"] += 1
            continue
        u = str(raw_user)
        if u != user:
            if user is not None:
                if u < user:
                    raise DataError(f"--stream input is not sorted by user: {u!r} comes after {user!r}; sort the "
                                    "rows by the user column (or drop --stream)")
                if texts:
                    yield user, texts
            user, texts = u, []
        t = norm(raw_text if isinstance(raw_text, str) else ("" if raw_text is None else str(raw_text)))
        if t:
            texts.append(t)
    if user is not None and texts:
        yield user, texts


class _Batcher:
    """Collect whole users until ENCODE_BATCH sentences, encode them in one call, hand them to their writers."""

    def __init__(self, tok: Any, writers: dict[str, StoreWriter], num_threads: int) -> None:
        self.tok, self.writers, self.num_threads = tok, writers, num_threads
        self.users: list[tuple[str, str, list[str]]] = []
        self.sentences = 0

    def add(self, split: str, user: str, texts: list[str]) -> None:
        self.users.append((split, user, texts))
        self.sentences += len(texts)
        if self.sentences >= ENCODE_BATCH:
            self.flush()

    def flush(self) -> None:
        if not self.users:
            return
        ids = self.tok.encode([t for _, _, texts in self.users for t in texts], num_threads=self.num_threads)
        a = 0
        for split, user, texts in self.users:
            self.writers[split].add_user(user, texts, ids[a:a + len(texts)])
            a += len(texts)
        self.users, self.sentences = [], 0


def prepare_stream(cfg: Any, say: Callable[[str], None]) -> Path:
    """The streamed `prepare` (see module docstring); `cfg` is a validated PrepareConfig with stream=True."""
    from pflm.data.prepare import _public_prior, build_manifest

    out = Path(cfg.out).expanduser()
    t0 = time.perf_counter()
    part = cfg.partition
    norm = Normalizer(cfg.normalizer)
    stats = {"raw_rows": 0, "rows_without_user": 0, "users_below_min": 0, "users_kept": 0}
    if part.max_sentences is not None:
        stats["sentences_over_max"] = 0
    with atomic_directory(out, overwrite=cfg.overwrite) as tmp:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        tok = train_tokenizer([], cfg.tokenizer, tmp, seed=part.seed, normalize=norm)
        prior_counts = _public_prior(cfg, tok, norm)
        say(f"public {tok.model_type} tokenizer, vocab {tok.vocab_size} ({time.perf_counter() - t0:.1f}s)")
        writers = {name: StoreWriter(tmp / name, vocab_size=tok.vocab_size if name == "train" else None,
                                     chunk_rows=WRITE_CHUNK_ROWS) for name in SPLITS}
        batcher = _Batcher(tok, writers, cfg.tokenizer.num_threads)
        rows = iter_rows(cfg.input, cfg.text_column, cfg.user_column)
        for user, texts in iter_users(rows, norm, stats):
            if len(texts) < part.min_sentences:
                stats["users_below_min"] += 1
                continue
            if part.max_sentences is not None and len(texts) > part.max_sentences:
                stats["sentences_over_max"] += len(texts) - part.max_sentences
                keep = cap_rows(part.seed, user, len(texts), part.max_sentences)
                texts = [texts[i] for i in keep]
            stats["users_kept"] += 1
            batcher.add(split_of(part.seed, user, part.split), user, texts)
            if stats["users_kept"] % 100_000 == 0:
                say(f"{stats['users_kept']} users ({time.perf_counter() - t0:.1f}s)")
        batcher.flush()
        split_stats = {name: w.close() for name, w in writers.items()}
        for name in SPLITS:
            if split_stats[name]["users"] == 0:
                raise DataError(f"split {name!r} has zero users ({stats['users_kept']} users in total); use more "
                                "users or change --split")
        assert writers["train"].token_counts is not None
        np.save(tmp / TOKEN_COUNTS, writers["train"].token_counts)
        source = {"input": cfg.input, "text_column": cfg.text_column, "user_column": cfg.user_column,
                  "streamed": True, "raw_rows": stats.pop("raw_rows")}
        info = {**part.to_dict(), "assignment": "hash(seed, user)", **stats}
        manifest = build_manifest(cfg, source, info, tok, prior_counts, None, None, split_stats, tmp)
        atomic_write_json(tmp / MANIFEST, manifest)
    say(f"wrote {out} ({time.perf_counter() - t0:.1f}s)")
    return out
