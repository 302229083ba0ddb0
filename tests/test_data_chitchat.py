"""The embedded chitchat default (a sender subset, to stay fast) and the synthetic recipe through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from pflm.data.corpora import chitchat, synthetic
from pflm.cli import main
from pflm.data.partition import PartitionConfig
from pflm.data.prepare import PrepareConfig, prepare
from pflm.data.store import FederatedData
from pflm.data.tokenizer import TokenizerConfig


def test_chitchat_subset_prepares_with_sender_users(tmp_path: Path) -> None:
    rows = chitchat.load(max_users=80)
    assert len(set(rows["user"])) == 80
    cfg = PrepareConfig(out=str(tmp_path / "cc"), corpus="chitchat", max_users=80,
                        partition=PartitionConfig(min_sentences=chitchat.DEFAULTS["min_sentences"]),
                        tokenizer=TokenizerConfig(model_type="word", vocab_size=1000))
    fd = FederatedData.open(prepare(cfg))
    m = fd.manifest
    users = [u for s in ("train", "val", "test") for u in fd.users(s)]
    assert set(users) <= set(rows["user"]) and len(users) == len(set(users))
    assert m["partition"]["users_kept"] == len(users) >= 40
    assert m["source"]["corpus"] == "chitchat" and m["tokenizer"]["model_type"] == "word"
    assert m["tokenizer"]["max_word_vocab_supported"] >= 1000
    assert all(m["splits"][s]["users"] >= 1 for s in ("train", "val", "test"))
    assert all(len(fd.user_texts("train", i)) >= 5 for i in range(fd.num_users("train")))


def test_synthetic_users_differ_and_are_seeded() -> None:
    a = synthetic.generate(30, (20, 20), seed=5)
    assert synthetic.generate(30, (20, 20), seed=5) == a
    assert synthetic.generate(30, (20, 20), seed=6) != a
    by_user: dict[str, set[str]] = {}
    for u, t in zip(a["user"], a["text"]):
        by_user.setdefault(u, set()).update(t.lower().split())
    vocab = set().union(*by_user.values())
    assert len(vocab) > 250  # a few hundred words across users
    sets = list(by_user.values())
    overlaps = [len(x & y) / len(x | y) for i, x in enumerate(sets) for y in sets[i + 1:]]
    assert max(overlaps) < 0.9  # users have their own contacts, places and tastes
    assert synthetic.user_rows(7, 5, seed=5) == synthetic.user_rows(7, 5, seed=5)


def test_synthetic_recipe_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "syn"
    rc = main(["prepare", "--corpus", "synthetic", "--num-users", "50", "--out", str(out), "--model-type",
               "unigram", "--vocab-size", "200", "--max-sentences", "10", "--split", "0.6,0.2,0.2"])
    printed = capsys.readouterr().out
    assert rc == 0
    fd = FederatedData.open(out)
    assert fd.tokenizer.model_type == "unigram" and fd.vocab_size == 200
    assert [fd.num_users(s) for s in ("train", "val", "test")] == [30, 10, 10]
    for s in ("train", "val", "test"):
        m = fd.manifest["splits"][s]
        assert f"{s:<6} {m['users']:>9} {m['sentences']:>11} {m['words']:>12}" in printed
        assert m["sentences"] <= 10 * m["users"]
