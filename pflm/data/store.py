"""On-disk federated dataset: per-split Arrow IPC rows sorted by user plus a user index, read by memory map.

Layout of a prepared directory (format_version 1):

    manifest.json            counts per split, tokenizer, normalisation, source, partition, seed, versions,
                             privacy {vocabulary, prior: public|dp|private, dp_release}
    tokenizer.model/.vocab   SentencePiece model (special ids pad=0 unk=1 bos=2 eos=3)
    token_counts.npy         int64 [vocab_size]: token frequencies over the *train* users' tokens (private)
    prior_counts.npy         float64 [vocab_size]: public or DP prior (absent when the vocabulary is private)
    {train,val,test}/data.arrow   Arrow IPC file (uncompressed, memory-mappable), rows sorted by user:
                                  user: string, text: string (normalised), tokens: list<int32> (no bos/eos)
    {train,val,test}/index.arrow  one row per user in store order: user: string, offset: int64, count: int64

Reading one user maps the files and slices `count` rows at `offset`: O(that user), never touching other
users' pages; `FederatedData.rows_read` counts the rows materialised. Writing streams fixed-size record
batches, so neither side needs all users in RAM (the index holds one small row per user).

`token_counts.npy` is exact train-user data and must never leave the data directory. The prior the server may
use (NCE noise, PEU row choice, output-bias init) is `FederatedData.prior_counts()`: public or DP when
`privacy_info["prior"]` says so, else those exact counts. `public_manifest` is the copy of the manifest that may
be released next to a trained model (docs/vocabulary.md).
"""

from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from pflm.data.normalize import Normalizer, NormalizerConfig
from pflm.data.partition import SPLITS
from pflm.data.tokenizer import Tokenizer
from pflm.errors import DataError

FORMAT_VERSION = 1
DATA_FILE = "data.arrow"
INDEX_FILE = "index.arrow"
MANIFEST = "manifest.json"
TOKEN_COUNTS = "token_counts.npy"
PRIOR_COUNTS = "prior_counts.npy"  # public (wordfreq / --tokenizer-input file) or DP frequency prior
PRIVATE_INFO: dict[str, Any] = {"vocabulary": "private", "prior": "private", "dp_release": None}
DATA_SCHEMA = pa.schema([("user", pa.string()), ("text", pa.string()), ("tokens", pa.list_(pa.int32()))])
INDEX_SCHEMA = pa.schema([("user", pa.string()), ("offset", pa.int64()), ("count", pa.int64())])


class StoreWriter:
    """Stream one split to `split_dir` user by user; users must arrive in strictly increasing string order."""

    def __init__(self, split_dir: str | os.PathLike, vocab_size: int | None = None, chunk_rows: int = 65_536) -> None:
        self.dir = Path(split_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.chunk_rows = chunk_rows
        self._data = pa.ipc.new_file(str(self.dir / DATA_FILE), DATA_SCHEMA)
        self._index = pa.ipc.new_file(str(self.dir / INDEX_FILE), INDEX_SCHEMA)
        self._rows: tuple[list[str], list[str], list[Sequence[int]]] = ([], [], [])
        self._idx: tuple[list[str], list[int], list[int]] = ([], [], [])
        self._last: str | None = None
        self.token_counts = np.zeros(vocab_size, dtype=np.int64) if vocab_size else None
        self.stats = {"users": 0, "sentences": 0, "words": 0, "tokens": 0}
        self._closed = False

    def add_user(self, user: str, texts: Sequence[str], tokens: Sequence[Sequence[int]]) -> None:
        if self._last is not None and not user > self._last:
            raise ValueError(f"users must be added in increasing order: {user!r} after {self._last!r}")
        if len(texts) != len(tokens) or not texts:
            raise ValueError(f"user {user!r}: need the same non-zero number of texts and token lists")
        self._last = user
        self._idx[0].append(user)
        self._idx[1].append(self.stats["sentences"])
        self._idx[2].append(len(texts))
        self._rows[0].extend([user] * len(texts))
        self._rows[1].extend(texts)
        self._rows[2].extend(tokens)
        self.stats["users"] += 1
        self.stats["sentences"] += len(texts)
        self.stats["words"] += sum(len(t.split()) for t in texts)
        if len(self._rows[0]) >= self.chunk_rows:
            self._flush()

    def _flush(self) -> None:
        users, texts, tokens = self._rows
        if users:
            tok = pa.array(tokens, type=pa.list_(pa.int32()))
            flat = tok.values.to_numpy(zero_copy_only=False)
            self.stats["tokens"] += int(flat.size)
            if self.token_counts is not None and flat.size:
                if flat.min() < 0 or flat.max() >= self.token_counts.size:
                    raise ValueError(f"token id outside [0, {self.token_counts.size})")
                self.token_counts += np.bincount(flat, minlength=self.token_counts.size)
            self._data.write_batch(pa.record_batch([pa.array(users, pa.string()), pa.array(texts, pa.string()), tok],
                                                   schema=DATA_SCHEMA))
            self._rows = ([], [], [])
        if self._idx[0]:
            self._index.write_batch(pa.record_batch(
                [pa.array(self._idx[0], pa.string()), pa.array(self._idx[1], pa.int64()),
                 pa.array(self._idx[2], pa.int64())], schema=INDEX_SCHEMA))
            self._idx = ([], [], [])

    def close(self) -> dict[str, int]:
        if not self._closed:
            self._flush()
            self._data.close()
            self._index.close()
            self._closed = True
        return dict(self.stats)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class SplitStore:
    """Memory-mapped read access to one split."""

    def __init__(self, split_dir: str | os.PathLike) -> None:
        self.dir = Path(split_dir)
        for name in (DATA_FILE, INDEX_FILE):
            if not (self.dir / name).is_file():
                raise DataError(f"{self.dir / name} missing; the dataset is incomplete, re-run `pflm prepare`")
        try:
            self._data = pa.ipc.open_file(pa.memory_map(str(self.dir / DATA_FILE), "r")).read_all()
            index = pa.ipc.open_file(pa.memory_map(str(self.dir / INDEX_FILE), "r")).read_all()
        except pa.ArrowInvalid as e:
            raise DataError(f"{self.dir}: unreadable store ({e}); re-run `pflm prepare`") from None
        self._index = index
        self.offsets = index.column("offset").to_numpy()
        self.counts = index.column("count").to_numpy()
        self._users: list[str] | None = None
        self.rows_read = 0

    @property
    def num_users(self) -> int:
        return self._index.num_rows

    @property
    def num_rows(self) -> int:
        return self._data.num_rows

    def users(self) -> list[str]:
        if self._users is None:
            self._users = self._index.column("user").to_pylist()
        return self._users

    def position(self, user: int | str) -> int:
        if isinstance(user, (int, np.integer)) and not isinstance(user, bool):
            i = int(user)
            if not 0 <= i < self.num_users:
                raise IndexError(f"user index {i} out of range [0, {self.num_users})")
            return i
        users = self.users()
        i = bisect.bisect_left(users, user)
        if i == len(users) or users[i] != user:
            raise KeyError(f"user {user!r} not in {self.dir.name}")
        return i

    def user_rows(self, user: int | str) -> pa.Table:
        i = self.position(user)
        off, cnt = int(self.offsets[i]), int(self.counts[i])
        self.rows_read += cnt
        return self._data.slice(off, cnt)

    def user_tokens(self, user: int | str) -> list[list[int]]:
        return self.user_rows(user).column("tokens").to_pylist()

    def user_texts(self, user: int | str) -> list[str]:
        return self.user_rows(user).column("text").to_pylist()

    def user_token_arrays(self, user: int | str) -> tuple[np.ndarray, np.ndarray]:
        """(flat int32 token ids, int64 offsets [rows+1]) of one user, without building Python lists."""
        col = self.user_rows(user).column("tokens").combine_chunks()
        offsets = col.offsets.to_numpy().astype(np.int64)
        flat = col.values.to_numpy()[offsets[0]:offsets[-1]]
        return flat, offsets - offsets[0]


class FederatedData:
    """A prepared federated dataset (see module docstring); open with `FederatedData.open(path)`."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        self.manifest = manifest
        self.tokenizer = Tokenizer.load(path / manifest["tokenizer"]["path"])
        self.normalizer = Normalizer(NormalizerConfig.from_dict(manifest["normalization"]))
        self._splits: dict[str, SplitStore] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> "FederatedData":
        path = Path(path)
        mpath = path / MANIFEST
        if not mpath.is_file():
            raise DataError(f"{path}: no {MANIFEST}; point at a directory made by `pflm prepare`")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{mpath}: not valid JSON ({e}); re-run `pflm prepare`") from None
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise DataError(
                f"{mpath}: format_version {version!r} is not supported (this pflm reads {FORMAT_VERSION}); "
                "re-run `pflm prepare` with this version"
            )
        for key in ("splits", "tokenizer", "normalization"):
            if key not in manifest:
                raise DataError(f"{mpath}: missing {key!r}; re-run `pflm prepare`")
        return cls(path, manifest)

    def split(self, split: str) -> SplitStore:
        if split not in SPLITS:
            raise KeyError(f"split {split!r} unknown; use one of {', '.join(SPLITS)}")
        if split not in self._splits:
            self._splits[split] = SplitStore(self.path / split)
        return self._splits[split]

    @property
    def rows_read(self) -> int:
        return sum(s.rows_read for s in self._splits.values())

    def users(self, split: str) -> list[str]:
        return self.split(split).users()

    def num_users(self, split: str) -> int:
        return self.split(split).num_users

    def user_tokens(self, split: str, user: int | str) -> list[list[int]]:
        return self.split(split).user_tokens(user)

    def user_texts(self, split: str, user: int | str) -> list[str]:
        return self.split(split).user_texts(user)

    def user_token_arrays(self, split: str, user: int | str) -> tuple[np.ndarray, np.ndarray]:
        """Fast path: (flat int32 ids, int64 offsets [sentences+1]); sentence k is flat[offsets[k]:offsets[k+1]]."""
        return self.split(split).user_token_arrays(user)

    def iter_users(self, split: str) -> Iterator[tuple[str, list[list[int]]]]:
        store = self.split(split)
        users = store.users()
        for i in range(store.num_users):
            yield users[i], store.user_tokens(i)

    def token_counts(self) -> np.ndarray:
        f = self.path / TOKEN_COUNTS
        if not f.is_file():
            raise DataError(f"{f} missing; re-run `pflm prepare`")
        return np.load(f)

    def prior_counts(self) -> np.ndarray:
        """The frequency prior the server uses for PEU row choice, NCE noise and output-bias init: public or DP
        (`prior_counts.npy`) when `privacy_info["prior"]` says so, else the exact train token counts, which are
        private (docs/vocabulary.md)."""
        info = self.manifest.get("prior", {"path": TOKEN_COUNTS})
        f = self.path / info["path"]
        if not f.is_file():
            raise DataError(f"{f} missing; re-run `pflm prepare`")
        return np.load(f).astype(np.float64)

    @property
    def prior_source(self) -> str:
        return self.manifest.get("prior", {}).get("computed_from", "train users' tokens")

    @property
    def privacy_info(self) -> dict[str, Any]:
        """{"vocabulary", "prior": "public"|"dp"|"private", "dp_release": None | DP parameters to account}."""
        return privacy_info(self.manifest)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def __repr__(self) -> str:
        counts = {k: v.get("users") for k, v in self.manifest["splits"].items()}
        return f"FederatedData({self.path}, users={counts}, {self.tokenizer!r})"


def privacy_info(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest's privacy section; manifests written before it existed are private/private."""
    info = manifest.get("privacy")
    return json.loads(json.dumps(info)) if isinstance(info, dict) else dict(PRIVATE_INFO)


_PUBLIC_KEYS = ("format_version", "pflm_version", "created", "normalization", "seed")
_PUBLIC_SOURCE = ("corpus", "package", "max_users", "num_users", "sentences_per_user", "seed", "input",
                  "text_column", "user_column", "hub_split")
_PUBLIC_PARTITION = ("scheme", "num_users", "alpha", "min_sentences", "max_sentences", "split", "seed", "users_kept")


def public_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The release-safe copy of a data manifest (for runs/<name>/data_manifest.json): settings, tokenizer info,
    privacy section and users per split only; nothing else derived from user data unless it is DP. Idempotent."""
    info = privacy_info(manifest)
    out: dict[str, Any] = {k: manifest[k] for k in _PUBLIC_KEYS if k in manifest}
    tok = dict(manifest.get("tokenizer", {}))
    if info["vocabulary"] != "public":  # the number of distinct train words: not DP
        tok.pop("max_word_vocab_supported", None)
    out["tokenizer"] = tok
    out["privacy"] = info
    if isinstance(manifest.get("source"), dict):
        out["source"] = {k: v for k, v in manifest["source"].items() if k in _PUBLIC_SOURCE}
    if isinstance(manifest.get("partition"), dict):
        out["partition"] = {k: v for k, v in manifest["partition"].items() if k in _PUBLIC_PARTITION}
    if isinstance(manifest.get("prior"), dict):
        out["prior"] = {k: v for k, v in manifest["prior"].items() if k in ("path", "computed_from")}
    out["splits"] = {name: {"users": int(s["users"])} for name, s in manifest.get("splits", {}).items()
                     if isinstance(s, dict) and "users" in s}
    return json.loads(json.dumps(out))


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two manifests (full or public) describe the same tokenizer, comparing only release-safe fields."""
    return public_manifest(a).get("tokenizer") == public_manifest(b).get("tokenizer")
