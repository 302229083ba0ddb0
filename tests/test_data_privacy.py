"""Attacker's view of `pflm prepare`: a rare user's word must not reach the released vocabulary, prior or manifest."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from pflm import cli
from pflm.data.dp_vocab import DPVocabConfig, dp_vocabulary, threshold_delta, user_top_words, users_per_word
from pflm.data.partition import PartitionConfig
from pflm.data.prepare import PrepareConfig, prepare
from pflm.data.store import FederatedData, public_manifest, same_tokenizer
from pflm.data.tokenizer import TokenizerConfig
from pflm.errors import ConfigError
from pflm.secure_random import SecureRandom, derive_key

SECRET = "zyzzyva"  # used by exactly one training user, 1000 times
COMMON = ("call", "mom", "play", "jazz")  # used by every other user
DP = DPVocabConfig(noise_multiplier=0.5, max_words_per_user=4, threshold_delta=1e-8)
SPLIT = PartitionConfig(split=(0.9, 0.05, 0.05), seed=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """80 users saying the common words (3 also say "dad"), and one victim repeating SECRET 1000 times."""
    rows = []
    for u in range(80):
        rows += [{"user": f"u{u:03d}", "text": "Call mom."}, {"user": f"u{u:03d}", "text": "play jazz"}]
        if u % 27 == 0:  # a word of only 3 users: below the threshold too
            rows.append({"user": f"u{u:03d}", "text": "call dad"})
    rows += [{"user": "victim", "text": " ".join([SECRET] * 5)} for _ in range(200)]
    path = tmp_path_factory.mktemp("corpus") / "users.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepare(corpus: Path, out: Path, vocab_size: int = 12, **kw: object) -> FederatedData:
    tok = TokenizerConfig(model_type=str(kw.pop("model_type", "word")), vocab_size=vocab_size,
                          tokenizer_input=kw.pop("tokenizer_input", None))  # type: ignore[arg-type]
    cfg = PrepareConfig(out=str(out), input=str(corpus), user_column="user", partition=SPLIT, tokenizer=tok,
                        **kw)  # type: ignore[arg-type]
    return FederatedData.open(prepare(cfg))


def _words(fd: FederatedData) -> set[str]:
    tok = fd.tokenizer
    return {tok.id_to_piece(i).lstrip("\u2581") for i in range(4, tok.vocab_size)}


@pytest.fixture(scope="module")
def dp_pair(corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[FederatedData, FederatedData]:
    base = tmp_path_factory.mktemp("dp")
    return (_prepare(corpus, base / "a", vocab_source="dp", vocab_dp=DP),
            _prepare(corpus, base / "b", vocab_source="dp", vocab_dp=DP))


def test_private_path_leaks_the_secret_and_says_so(corpus: Path, tmp_path: Path) -> None:
    fd = _prepare(corpus, tmp_path / "exact", vocab_size=6)  # room for only the 2 most frequent words
    assert "victim" in fd.users("train")
    assert SECRET in _words(fd)  # the attack works on a vocabulary counted on the train users...
    assert fd.privacy_info == {"vocabulary": "private", "prior": "private", "dp_release": None}  # ...and it is labelled
    assert fd.manifest["prior"]["path"] == "token_counts.npy"
    assert "max_word_vocab_supported" not in public_manifest(fd.manifest)["tokenizer"]


def test_dp_vocabulary_drops_one_users_word_and_keeps_common_ones(dp_pair: tuple[FederatedData, ...]) -> None:
    for fd in dp_pair:
        assert "victim" in fd.users("train")
        assert _words(fd) == set(COMMON)
        released = [fd.path / "tokenizer.model", fd.path / "prior_counts.npy"]
        assert all(SECRET.encode() not in f.read_bytes() for f in released)
        assert SECRET not in json.dumps(public_manifest(fd.manifest))
        assert fd.tokenizer.encode([f"call {SECRET}"]) == [[fd.tokenizer.word_to_id("call"), fd.tokenizer.unk_id]]


def test_dp_prior_is_noisy_fresh_and_not_the_exact_counts(dp_pair: tuple[FederatedData, FederatedData]) -> None:
    a, b = dp_pair
    pa, pb = a.prior_counts(), b.prior_counts()
    assert a.manifest["seed"] == b.manifest["seed"] and _words(a) == _words(b)
    ids = [a.tokenizer.word_to_id(w) for w in COMMON]
    ids_b = [b.tokenizer.word_to_id(w) for w in COMMON]
    assert not np.array_equal(pa[ids], pb[ids_b])  # fresh CSPRNG key each time, not the seed
    hist = users_per_word([a.user_texts("train", i) for i in range(a.num_users("train"))], DP.max_words_per_user)
    exact = np.array([hist[w] for w in COMMON], dtype=np.float64)  # users with the word among their top k
    assert np.all(pa[ids] != exact) and np.all(pa[ids] != np.round(pa[ids]))
    assert not np.allclose(pa[ids], a.token_counts()[ids])
    sd = DP.noise_multiplier * math.sqrt(DP.max_words_per_user)  # the prior is in users: noise std sigma*sqrt(k)
    assert np.all(np.abs(pa[ids] - exact) < 8 * sd) and np.all(np.abs(pb[ids_b] - exact) < 8 * sd)
    assert np.all(pa[:4] == 0) and np.all(pa[4:] > 0)
    # piece scores in tokenizer.model are the log DP prior, not the exact counts
    scores = np.array([a.tokenizer._sp.get_score(i) for i in ids])
    expected = np.log(np.round(pa[ids] * 1000) / np.round(pa[4:] * 1000).sum())
    assert np.allclose(scores, expected, atol=1e-4)


def test_dp_manifest_release_record(dp_pair: tuple[FederatedData, ...]) -> None:
    fd = dp_pair[0]
    info = fd.privacy_info
    assert info["vocabulary"] == info["prior"] == "dp"
    rel = info["dp_release"]
    assert rel["mechanism"] == "gaussian_thresholded_histogram"
    assert (rel["noise_multiplier"], rel["sampling_rate"], rel["count"]) == (0.5, 1.0, 1)
    assert (rel["threshold_delta"], rel["max_words_per_user"]) == (1e-8, 4)
    assert rel["users"] == fd.num_users("train")
    assert math.isclose(threshold_delta(rel["threshold"], 0.5, 4), 1e-8, rel_tol=1e-6)
    assert fd.manifest["prior"]["path"] == "prior_counts.npy"
    assert fd.vocab_size == 8 and rel["words_released"] == 4  # asked for 12: shrinks rather than fail


def test_public_file_vocabulary_gets_the_files_prior(corpus: Path, tmp_path: Path) -> None:
    public = tmp_path / "public.txt"
    public.write_text("Call mom\nplay jazz please\nplay jazz\njazz\n")
    fd = _prepare(corpus, tmp_path / "file", vocab_size=9, tokenizer_input=str(public))
    assert fd.privacy_info == {"vocabulary": "public", "prior": "public", "dp_release": None}
    prior, tok = fd.prior_counts(), fd.tokenizer
    expected = np.zeros(tok.vocab_size)
    for w, n in {"call": 1, "mom": 1, "play": 2, "jazz": 3, "please": 1}.items():
        expected[tok.word_to_id(w)] = n
    assert np.array_equal(prior, expected)  # counted on the public file...
    assert not np.array_equal(prior, fd.token_counts())  # ...not on the train users (80 x call, 200 x unk, ...)
    assert fd.manifest["prior"]["path"] == "prior_counts.npy"
    sub = _prepare(corpus, tmp_path / "bpe", vocab_size=30, tokenizer_input=str(public), model_type="bpe")
    assert sub.privacy_info["prior"] == "public" and sub.prior_counts().sum() == sum(
        len(t) for t in sub.tokenizer.encode(["call mom", "play jazz please", "play jazz", "jazz"]))


def test_wordfreq_is_public(corpus: Path, tmp_path: Path) -> None:
    fd = _prepare(corpus, tmp_path / "wf", vocab_size=60, tokenizer_input="wordfreq")
    assert fd.privacy_info == {"vocabulary": "public", "prior": "public", "dp_release": None}
    assert SECRET not in _words(fd) and fd.prior_counts()[4:].min() > 0


def test_public_manifest_drops_user_derived_counts(dp_pair: tuple[FederatedData, ...], tmp_path: Path) -> None:
    m = dp_pair[0].manifest
    pub = public_manifest(m)
    assert pub == public_manifest(pub)  # idempotent
    assert pub["splits"] == {s: {"users": m["splits"][s]["users"]} for s in ("train", "val", "test")}
    assert "raw_rows" not in pub["source"] and "token_counts" not in pub
    assert set(pub["partition"]) >= {"scheme", "split", "users_kept"}
    assert "rows_without_user" not in pub["partition"] and "users_below_min" not in pub["partition"]
    assert pub["tokenizer"]["vocab_size"] == m["tokenizer"]["vocab_size"] and pub["privacy"] == m["privacy"]
    assert pub["normalization"] == m["normalization"] and pub["format_version"] == m["format_version"]
    assert same_tokenizer(m, pub) and same_tokenizer(pub, m)
    assert not same_tokenizer(m, dp_pair[1].manifest)  # same settings, different DP vocabulary: the hash differs
    old = {k: v for k, v in m.items() if k != "privacy"}  # manifests from before the privacy section
    assert public_manifest(old)["privacy"] == {"vocabulary": "private", "prior": "private", "dp_release": None}
    text = json.dumps(pub)
    for split in m["splits"].values():
        assert f'"sentences": {split["sentences"]}' not in text and '"tokens"' not in text and '"words"' not in text


def test_dp_mechanism_units() -> None:
    assert user_top_words(["b a", "c b", "a"], 2) == ["a", "b"]  # ties broken by the word, deterministically
    assert user_top_words(["x y z"], 2) == ["x", "y"]
    users = [["common word"]] * 100 + [[" ".join(["rare"] * 1000)]]
    rng = SecureRandom(derive_key(7))  # reproducible only for this unit test; prepare always uses a fresh key
    out = dp_vocabulary(users, DPVocabConfig(noise_multiplier=1.0, max_words_per_user=2), 10, rng)
    assert set(out.words) == {"common", "word"} and out.release_record()["users"] == 101
    cfg = DPVocabConfig(noise_multiplier=2.0, max_words_per_user=16, threshold_delta=1e-6)
    assert math.isclose(threshold_delta(cfg.threshold, 2.0, 16), 1e-6, rel_tol=1e-6)
    with pytest.raises(ConfigError, match="vocab-dp-sigma"):
        DPVocabConfig(noise_multiplier=0.0)


@pytest.mark.parametrize("argv, message", [
    (["--vocab-source", "dp", "--model-type", "bpe", "--vocab-dp-sigma", "1"], "--model-type word"),
    (["--vocab-source", "dp", "--tokenizer-input", "wordfreq", "--vocab-dp-sigma", "1"], "drop --tokenizer-input"),
    (["--vocab-source", "dp"], "needs --vocab-dp-sigma"),
    (["--vocab-dp-sigma", "1"], "only apply with --vocab-source dp"),
])
def test_bad_flag_combinations(argv: list[str], message: str, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["prepare", "--corpus", "synthetic", "--num-users", "20", "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
