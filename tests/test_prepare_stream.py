"""`pflm prepare --stream`: same user data as the in-memory path, byte-identical to an all-in-RAM build of the same
split, memory that does not grow with the number of users, and one-line errors for input it cannot stream."""

from __future__ import annotations

import hashlib
import json
import random
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pflm.data import prepare_stream as ps
from pflm.data.normalize import Normalizer, NormalizerConfig
from pflm.data.partition import SPLITS, PartitionConfig
from pflm.data.prepare import PrepareConfig, prepare
from pflm.data.store import FederatedData, SplitStore, StoreWriter
from pflm.data.tokenizer import Tokenizer, TokenizerConfig
from pflm.errors import ConfigError, DataError

WORDS = ("the a to you i call mom set timer for minutes play music weather tomorrow remind me buy milk eggs "
         "turn on lights off what is time open door send message dad home work now later please thanks").split()


def write_corpus(path: Path, users: int, seed: int = 0, max_sentences: int = 6, extras: bool = True) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for u in range(users):
            for _ in range(rng.randint(1, max_sentences)):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9)))
                f.write(json.dumps({"user": f"u{u:06d}", "text": text.upper() if rng.random() < 0.1 else text}) + "\n")
            if extras and u % 50 == 7:  # punctuation-only row: empty after normalisation
                f.write(json.dumps({"user": f"u{u:06d}", "text": "?!"}) + "\n")
        if extras:
            f.write(json.dumps({"user": None, "text": "a row without a user"}) + "\n")


def cfg_for(src: Path, out: Path, stream: bool, **part) -> PrepareConfig:
    return PrepareConfig(out=str(out), input=str(src), user_column="user", stream=stream,
                         partition=PartitionConfig(**part),
                         tokenizer=TokenizerConfig(model_type="word", vocab_size=500, tokenizer_input="wordfreq"))


def user_data(out: Path) -> dict[str, tuple[list[str], list[list[int]]]]:
    fd = FederatedData.open(out)
    return {u: (fd.user_texts(s, u), fd.user_tokens(s, u)) for s in SPLITS for u in fd.users(s)}


def reference_store(src: Path, out: Path, seed: int, fractions: tuple[float, float, float], min_sentences: int,
                    vocab: Tokenizer) -> None:
    """All-in-RAM build with the streamed path's split rule: read everything, group, then write each split."""
    norm = Normalizer(NormalizerConfig())
    by_user: dict[str, list[str]] = {}
    for line in src.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        t = norm(row["text"])
        if row["user"] and t:
            by_user.setdefault(row["user"], []).append(t)
    for name in SPLITS:
        w = StoreWriter(out / name, vocab_size=vocab.vocab_size if name == "train" else None)
        for u in sorted(by_user):
            if len(by_user[u]) >= min_sentences and ps.split_of(seed, u, fractions) == name:
                w.add_user(u, by_user[u], vocab.encode(by_user[u]))
        w.close()
        if name == "train":
            np.save(out / "token_counts.npy", w.token_counts)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_stream_byte_identical_to_in_ram_build_and_same_users_as_prepare(tmp_path, monkeypatch):
    src = tmp_path / "corpus.jsonl"
    write_corpus(src, 400)
    monkeypatch.setattr(ps, "ENCODE_BATCH", 97)  # many encode batches and writer flushes inside one split
    monkeypatch.setattr(ps, "WRITE_CHUNK_ROWS", 113)
    streamed = prepare(cfg_for(src, tmp_path / "stream", True, min_sentences=2, seed=3))
    ref = tmp_path / "ref"
    reference_store(src, ref, 3, (0.8, 0.1, 0.1), 2, Tokenizer.load(streamed / "tokenizer.model"))
    for name in SPLITS:  # Arrow IPC bytes depend on record-batch boundaries: compare the decoded tables too
        a, b = FederatedData.open(streamed).split(name), SplitStore(ref / name)
        assert a._data.equals(b._data) and a._index.equals(b._index), name
    assert digest(streamed / "token_counts.npy") == digest(ref / "token_counts.npy")
    # The in-memory `prepare` (exact shuffled split) holds the same users with the same sentences and tokens.
    in_ram = prepare(cfg_for(src, tmp_path / "ram", False, min_sentences=2, seed=3))
    assert user_data(streamed) == user_data(in_ram)
    assert digest(streamed / "prior_counts.npy") == digest(in_ram / "prior_counts.npy")
    ts, tr = (Tokenizer.load(p / "tokenizer.model") for p in (streamed, in_ram))  # the file names its temp dir
    assert [ts.id_to_piece(i) for i in range(ts.vocab_size)] == [tr.id_to_piece(i) for i in range(tr.vocab_size)]
    ms, mr = (json.loads((p / "manifest.json").read_text()) for p in (streamed, in_ram))
    assert ms["partition"]["assignment"] == "hash(seed, user)"
    for k in ("users_kept", "users_below_min", "rows_without_user"):
        assert ms["partition"][k] == mr["partition"][k], k
    assert ms["source"]["raw_rows"] == mr["source"]["raw_rows"]
    assert sum(s["sentences"] for s in ms["splits"].values()) == sum(s["sentences"] for s in mr["splits"].values())
    for k in ("prior", "privacy", "normalization", "token_counts"):
        assert ms[k] == mr[k], k
    assert {**ms["tokenizer"], "sha256": 0} == {**mr["tokenizer"], "sha256": 0}
    users = [ms["splits"][s]["users"] for s in SPLITS]
    assert abs(users[0] / sum(users) - 0.8) < 0.08  # binomial around the fractions


def test_stream_cap_is_seeded_subset(tmp_path):
    src = tmp_path / "corpus.jsonl"
    write_corpus(src, 60, max_sentences=12, extras=False)
    a = user_data(prepare(cfg_for(src, tmp_path / "a", True, max_sentences=4, seed=1)))
    b = user_data(prepare(cfg_for(src, tmp_path / "b", True, max_sentences=4, seed=1)))
    full = user_data(prepare(cfg_for(src, tmp_path / "full", True, seed=1)))
    assert a == b and a.keys() == full.keys()
    for u, (texts, _) in a.items():
        assert len(texts) == min(4, len(full[u][0]))
        it = iter(full[u][0])
        assert all(t in it for t in texts)  # an ordered subsequence of the user's sentences


def _peak(src: Path, out: Path) -> int:
    tracemalloc.start()
    try:
        prepare(cfg_for(src, out, True))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_stream_memory_does_not_grow_with_users(tmp_path, monkeypatch):
    monkeypatch.setattr(ps, "ENCODE_BATCH", 1_000)  # bounds reached by both corpora (even their val/test splits)
    monkeypatch.setattr(ps, "WRITE_CHUNK_ROWS", 256)
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    write_corpus(small, 2_000, max_sentences=4, extras=False)
    write_corpus(big, 20_000, max_sentences=4, extras=False)
    prepare(cfg_for(small, tmp_path / "warm", True))  # wordfreq / tokenizer caches are not per-user memory
    p_small, p_big = _peak(small, tmp_path / "s"), _peak(big, tmp_path / "b")
    assert FederatedData.open(tmp_path / "b").num_users("train") > 9 * FederatedData.open(tmp_path / "s").num_users(
        "train")
    assert p_big < 1.3 * p_small, (p_small, p_big)


def test_stream_refuses_unsorted_input_and_private_vocab(tmp_path):
    src = tmp_path / "corpus.jsonl"
    rows = [{"user": "b", "text": "hello there"}, {"user": "a", "text": "call mom"}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError, match="not sorted by user"):
        prepare(cfg_for(src, tmp_path / "out", True))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    with pytest.raises(ConfigError, match="public vocabulary"):
        PrepareConfig(out=str(tmp_path / "x"), input=str(src), user_column="user", stream=True)
    with pytest.raises(ConfigError, match="--user-column"):
        PrepareConfig(out=str(tmp_path / "x"), input=str(src), stream=True,
                      partition=PartitionConfig(scheme="iid", num_users=2),
                      tokenizer=TokenizerConfig(tokenizer_input="wordfreq"))
