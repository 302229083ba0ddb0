"""Prepared store: user-disjoint splits, manifest counts, O(user) index reads, token counts, tokenizer round-trip."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pflm.data.corpora import synthetic
from pflm.data.normalize import NormalizerConfig
from pflm.data.partition import PartitionConfig, partition
from pflm.data.prepare import PrepareConfig, prepare
from pflm.data.store import FederatedData, StoreWriter
from pflm.data.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer
from pflm.errors import DataError


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("syn") / "ds"
    cfg = PrepareConfig(out=str(out), corpus="synthetic", synthetic_users=120, synthetic_sentences=(3, 30),
                        partition=PartitionConfig(min_sentences=5, max_sentences=25, seed=3),
                        tokenizer=TokenizerConfig(model_type="word", vocab_size=250))
    return prepare(cfg)


def test_splits_are_user_disjoint_and_sorted(prepared: Path) -> None:
    fd = FederatedData.open(prepared)
    users = {s: fd.users(s) for s in ("train", "val", "test")}
    assert all(users[s] == sorted(users[s]) for s in users)
    assert not set(users["train"]) & set(users["val"])
    assert not set(users["train"]) & set(users["test"])
    assert not set(users["val"]) & set(users["test"])
    total = sum(len(u) for u in users.values())
    assert fd.manifest["partition"]["users_kept"] == total
    assert len(users["train"]) == round(0.8 * total)
    for s in users:  # min/max sentences per user respected
        for i in range(fd.num_users(s)):
            assert 5 <= len(fd.user_tokens(s, i)) <= 25


def test_manifest_counts_match_recount(prepared: Path) -> None:
    fd = FederatedData.open(prepared)
    for split in ("train", "val", "test"):
        table = pa.ipc.open_file(str(prepared / split / "data.arrow")).read_all()
        texts = table.column("text").to_pylist()
        tokens = table.column("tokens").to_pylist()
        m = fd.manifest["splits"][split]
        assert m["users"] == len(set(table.column("user").to_pylist())) == fd.num_users(split)
        assert m["sentences"] == len(texts)
        assert m["words"] == sum(len(t.split()) for t in texts)
        assert m["tokens"] == sum(len(t) for t in tokens)
        assert all(t == fd.normalizer(t) and t for t in texts)  # stored text is normalised and non-empty
    train_tokens = np.concatenate(
        [np.asarray(t) for t in pa.ipc.open_file(str(prepared / "train/data.arrow")).read_all()
         .column("tokens").to_pylist()])
    counts = fd.token_counts()
    assert counts.dtype == np.int64 and counts.shape == (fd.tokenizer.vocab_size,)
    assert np.array_equal(counts, np.bincount(train_tokens, minlength=fd.tokenizer.vocab_size))


def test_single_user_reads_only_that_user(prepared: Path) -> None:
    full = pa.ipc.open_file(str(prepared / "train/data.arrow")).read_all()
    fd = FederatedData.open(prepared)
    users = fd.users("train")
    for i in (0, len(users) // 2, len(users) - 1):
        before = fd.rows_read
        by_index = fd.user_tokens("train", i)
        assert fd.rows_read - before == len(by_index)  # exactly that user's rows, nobody else's
        mask = np.array(full.column("user").to_pylist()) == users[i]
        assert by_index == full.filter(pa.array(mask)).column("tokens").to_pylist()
        assert fd.user_tokens("train", users[i]) == by_index
        flat, offsets = fd.user_token_arrays("train", i)
        assert flat.dtype == np.int32 and [flat[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])] == by_index
        assert fd.user_texts("train", users[i]) == full.filter(pa.array(mask)).column("text").to_pylist()
    scanned = list(fd.iter_users("train"))
    assert [u for u, _ in scanned] == users
    assert sum(len(t) for _, t in scanned) == full.num_rows
    with pytest.raises(KeyError):
        fd.user_tokens("train", "no-such-user")
    with pytest.raises(IndexError):
        fd.user_tokens("train", len(users))


def test_writer_streams_chunks_and_rejects_unsorted(tmp_path: Path) -> None:
    w = StoreWriter(tmp_path / "s", vocab_size=10, chunk_rows=4)
    for k in range(7):
        w.add_user(f"u{k}", [f"w{j}" for j in range(k + 1)], [[j % 10] for j in range(k + 1)])
    with pytest.raises(ValueError, match="increasing"):
        w.add_user("u0", ["x"], [[1]])
    stats = w.close()
    assert stats == {"users": 7, "sentences": 28, "words": 28, "tokens": 28}
    reader = pa.ipc.open_file(str(tmp_path / "s/data.arrow"))
    assert reader.num_record_batches > 1  # written in streaming chunks
    from pflm.data.store import SplitStore

    store = SplitStore(tmp_path / "s")
    assert store.user_texts("u3") == ["w0", "w1", "w2", "w3"] and store.rows_read == 4


@pytest.mark.parametrize("model_type, vocab", [("word", 200), ("unigram", 300), ("bpe", 300)])
def test_tokenizer_round_trip(tmp_path: Path, model_type: str, vocab: int) -> None:
    from pflm.data.normalize import Normalizer

    norm = Normalizer()
    rows = synthetic.generate(60, (10, 20), seed=1)
    texts = [norm(t) for t in rows["text"]]
    tok = train_tokenizer(texts, TokenizerConfig(model_type=model_type, vocab_size=vocab), tmp_path)
    tok = Tokenizer.load(tok.path)
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert tok.model_type == model_type and tok.vocab_size == vocab
    assert tok.id_to_piece(0) == "<pad>" and tok.id_to_piece(1) == "<unk>"
    in_vocab = [t for t, ids in zip(texts, tok.encode(texts)) if 1 not in ids]
    assert len(in_vocab) > len(texts) // 2
    for t, ids in zip(in_vocab, tok.encode(in_vocab)):
        assert tok.decode(ids) == t
        assert 2 not in ids and 3 not in ids  # encode adds no bos/eos
    if model_type == "word":
        ids = tok.encode(["call qqqzzz xxyyq mom"])[0]
        assert len(ids) == 4 and ids[1:3] == [1, 1]  # one unk per unknown word
        assert tok.piece_to_id("\u2581call") == ids[0] == tok.word_to_id("call")


def test_word_vocab_of_100k(tmp_path: Path) -> None:
    rng = random.Random(0)
    words: set[str] = set()
    while len(words) < 100_500:
        words.add("".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(4, 9))))
    pool = sorted(words)
    sents = [" ".join(pool[i:i + 10]) for i in range(0, len(pool), 10)]
    tok = train_tokenizer(sents, TokenizerConfig(model_type="word", vocab_size=100_000), tmp_path)
    assert tok.vocab_size == 100_000
    with pytest.raises(DataError, match="largest word vocab is 100504"):
        train_tokenizer(sents, TokenizerConfig(model_type="word", vocab_size=100_505), tmp_path / "b")


def test_partition_schemes_are_seeded() -> None:
    iid = partition(None, 1000, PartitionConfig(scheme="iid", num_users=50, seed=1))
    sizes = np.concatenate([s.counts for s in iid.splits.values()])
    assert sizes.sum() == 1000 and set(sizes.tolist()) == {20}
    a = partition(None, 1000, PartitionConfig(scheme="dirichlet", num_users=50, alpha=0.3, seed=1))
    b = partition(None, 1000, PartitionConfig(scheme="dirichlet", num_users=50, alpha=0.3, seed=1))
    assert all(a.splits[s].users == b.splits[s].users and np.array_equal(a.splits[s].rows, b.splits[s].rows)
               for s in a.splits)
    dsizes = np.concatenate([s.counts for s in a.splits.values()])
    assert dsizes.max() > 3 * np.median(dsizes)  # skewed user sizes
    rows = np.concatenate([s.rows for s in a.splits.values()])
    assert len(set(rows.tolist())) == rows.size  # every sentence in at most one user


def test_open_rejects_bad_store(tmp_path: Path, prepared: Path) -> None:
    with pytest.raises(DataError, match="manifest.json"):
        FederatedData.open(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    m = json.loads((prepared / "manifest.json").read_text())
    m["format_version"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="format_version 99"):
        FederatedData.open(bad)


def test_digits_setting_travels_with_store(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    lines = [{"uid": f"u{u}", "body": f"Meet me at {k} pm, OK?"} for u in range(10) for k in range(1, 7)]
    src.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = prepare(PrepareConfig(out=str(tmp_path / "o"), input=str(src), text_column="body", user_column="uid",
                                normalizer=NormalizerConfig(digits_to_words=True),
                                partition=PartitionConfig(split=(0.6, 0.2, 0.2)),
                                tokenizer=TokenizerConfig(vocab_size=12)))
    fd = FederatedData.open(out)
    assert fd.normalizer("at 5 pm") == "at five pm"
    assert fd.user_texts("train", 0)[0] == "meet me at one pm ok"
    assert fd.manifest["source"]["input"] == str(src)
    assert fd.num_users("train") == 6 and fd.num_users("val") == 2 and fd.num_users("test") == 2


def test_text_file_dirichlet_users_and_public_tokenizer_input(tmp_path: Path) -> None:
    rows = synthetic.generate(40, (10, 20), seed=2)
    src = tmp_path / "lines.txt"
    src.write_text("\n".join(rows["text"]) + "\n")
    public = tmp_path / "public.txt"
    public.write_text("Call mom.\nPlay some jazz\nwhat's the weather in Paris?\n" * 3)
    out = prepare(PrepareConfig(
        out=str(tmp_path / "o"), input=str(src),
        partition=PartitionConfig(scheme="dirichlet", num_users=25, alpha=1.0, seed=4),
        tokenizer=TokenizerConfig(model_type="word", vocab_size=14, tokenizer_input=str(public))))
    fd = FederatedData.open(out)
    assert fd.manifest["tokenizer"]["trained_on"] == f"file:{public}"
    assert fd.manifest["partition"]["scheme"] == "dirichlet"
    assert sum(fd.num_users(s) for s in ("train", "val", "test")) <= 25
    assert fd.users("train")[0].startswith("user")
    # vocabulary comes from the public file only: 10 distinct words + 4 specials
    assert fd.tokenizer.encode(["call mom play some jazz"]) == [[fd.tokenizer.word_to_id(w) for w in
                                                                 "call mom play some jazz".split()]]
    assert fd.tokenizer.word_to_id("alarm") == fd.tokenizer.unk_id
