"""`pflm rescore` output contract (last lines first_pass_wer/rescored_wer/oracle_wer) and `pflm nbest` sentence choice."""

import json
import re
import sys
import types

import pytest

from pflm.cli import main
from pflm.evaluation.nbest import write_nbest
from pflm.evaluation.rescore_cli import parse_grid, select_sentences
from pflm.errors import ConfigError
from tests.test_rescore_tuning import DEV, TEST_LM_RIGHT, TEST_LM_WRONG, UnigramScorer


@pytest.fixture
def fake_lm_scorer(monkeypatch):
    seen = []

    def load_scorer(run_dir):
        seen.append(run_dir)
        return UnigramScorer()

    mod = types.ModuleType("pflm.evaluation.lm_scorer")
    mod.load_scorer = load_scorer
    monkeypatch.setitem(sys.modules, "pflm.evaluation.lm_scorer", mod)
    return seen


def test_rescore_cli_last_lines(tmp_path, capsys, fake_lm_scorer):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dev = write_nbest(tmp_path / "dev.jsonl", DEV)
    test = write_nbest(tmp_path / "test.jsonl", TEST_LM_RIGHT + TEST_LM_WRONG[2:])
    out = tmp_path / "out"
    rc = main(["rescore", "--checkpoint", str(run_dir), "--dev", str(dev), "--test", str(test), "--out", str(out),
               "--alpha-grid", "0,0.001,0.01,0.1,1", "--beta-grid=-0.1:0.1:0.1"])
    assert rc == 0
    assert fake_lm_scorer == [str(run_dir)]
    lines = capsys.readouterr().out.strip().splitlines()
    # test: t1 (3 words, first pass 1 error, rescored 0), t3 (2 words, 1 error either way)
    assert lines[-4] == "relative_reduction: 0.5000"
    assert lines[-3] == "first_pass_wer: 0.4000"
    assert lines[-2] == "rescored_wer: 0.2000"
    assert lines[-1] == "oracle_wer: 0.2000"
    for line in lines[-3:]:
        assert re.fullmatch(r"(first_pass|rescored|oracle)_wer: \d+\.\d{4}", line)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["alpha"] == 0.01 and summary["beta"] == 0.0
    assert summary["dev_first_pass_wer"] == 0.25 and summary["dev_rescored_wer"] == 0.0
    rows = [json.loads(x) for x in (out / "test_utterances.jsonl").read_text().splitlines()]
    assert [r["utt_id"] for r in rows] == ["t1", "t3"]
    assert rows[0]["first_pass"] == "the cab ran" and rows[0]["rescored"] == "the cat ran"
    assert (out / "dev_grid.tsv").read_text().count("\n") == 1 + 5 * 3


def test_rescore_cli_malformed_dev_exits_2(tmp_path, capsys, fake_lm_scorer):
    (tmp_path / "dev.jsonl").write_text('{"utt_id": "a", "ref": "x", "nbest": []}\n')
    test = write_nbest(tmp_path / "test.jsonl", TEST_LM_RIGHT)
    rc = main(["rescore", "--checkpoint", str(tmp_path), "--dev", str(tmp_path / "dev.jsonl"), "--test", str(test)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "line 1" in err and "'nbest' is empty" in err and len(err.strip().splitlines()) == 1


def test_parse_grid():
    assert parse_grid("0:1:0.25", "alpha-grid") == (0.0, 0.25, 0.5, 0.75, 1.0)
    assert parse_grid("0.5,2", "alpha-grid") == (0.5, 2.0)
    assert len(parse_grid("0:2:0.05", "alpha-grid")) == 41
    with pytest.raises(ConfigError, match="alpha-grid"):
        parse_grid("0:x:1", "alpha-grid")
    with pytest.raises(ConfigError):
        parse_grid("1:0:0.1", "alpha-grid")


TEXTS = {
    "u1": ["hi", "how are you doing", "i like my cat a lot"],
    "u2": ["ok then", "see you tomorrow at noon"],
    "u3": ["what", "this is far too long " * 5],
    "u4": ["we went to the beach", "it was sunny", "fun times with friends"],
}


def test_select_sentences_is_seeded_and_filtered():
    a = select_sentences(list(TEXTS), TEXTS.__getitem__, 5, seed=3, id_prefix="test-")
    assert a == select_sentences(list(reversed(list(TEXTS))), TEXTS.__getitem__, 5, seed=3, id_prefix="test-")
    assert len(a) == 5 and len({u for u, _ in a}) == 5
    assert all(3 <= len(t.split()) <= 20 for _, t in a)
    assert all(t == TEXTS[u.split("-")[1]][int(u.split("-")[2])] for u, t in a)
    # users without eligible sentences are skipped; asking for more than exist returns all eligible ones
    everything = select_sentences(list(TEXTS), TEXTS.__getitem__, 100, seed=0)
    assert len(everything) == 6
    assert not any(u.startswith("u3") for u, _ in everything)
    # one per user before any user's second sentence
    assert len({u.split("-")[1] for u, _ in a[:3]}) == 3


def test_nbest_cli_reads_the_federated_store(tmp_path, monkeypatch, capsys):
    """--data goes through FederatedData.open/users/user_texts; generation itself is stubbed here."""
    calls = {}

    class FakeStore:
        normalizer = staticmethod(str.upper)

        @classmethod
        def open(cls, path):
            calls["open"] = path
            return cls()

        def users(self, split):
            calls["split"] = split
            return list(TEXTS)

        def user_texts(self, split, user):
            return TEXTS[user]

    store = types.ModuleType("pflm.data.store")
    store.FederatedData = FakeStore
    monkeypatch.setitem(sys.modules, "pflm.data.store", store)
    import pflm.evaluation.asr_nbest as gen

    def fake_generate(sentences, out_path, **kw):
        calls["sentences"] = sentences
        calls["kw"] = kw
        from pflm.evaluation.nbest import Hypothesis, NBestUtterance

        path = write_nbest(out_path, [NBestUtterance(u, t, (Hypothesis(t, -1.0), Hypothesis("x", -2.0))) for u, t in sentences])
        return path, gen.GenerationStats(utterances=len(sentences), cached=len(sentences))

    monkeypatch.setattr(gen, "generate_nbest_with_stats", fake_generate)
    rc = main(["nbest", "--data", str(tmp_path), "--split", "dev", "--num", "4", "--voice", "awb",
               "--out", str(tmp_path / "nb.jsonl"), "--cache-dir", str(tmp_path / "c")])
    assert rc == 0
    assert calls["open"] == str(tmp_path) and calls["split"] == "dev"
    assert len(calls["sentences"]) == 4 and all(u.startswith("dev-") for u, _ in calls["sentences"])
    assert calls["kw"]["voice"] == "awb" and calls["kw"]["normalize"] is str.upper
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-2:] == ["first_pass_wer: 0.0000", "oracle_wer: 0.0000"]


def test_nbest_cli_needs_a_source(tmp_path, capsys):
    assert main(["nbest", "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "--data" in capsys.readouterr().err
