"""N-best JSONL reader/writer: round trip, and malformed lines give a DataError naming the file and line number."""

import json

import pytest

from pflm.errors import DataError
from pflm.evaluation.nbest import (
    Hypothesis,
    NBestUtterance,
    read_kaldi_nbest,
    read_nbest,
    write_nbest,
)

GOOD = [
    {"utt_id": "u1", "ref": "hi there", "nbest": [{"text": "hi there", "score": -1.5}, {"text": "high there", "score": -2}]},
    {"utt_id": "u2", "ref": "", "nbest": [{"text": "", "score": 0.0, "am_score": -3.0, "lm_score": -1.25}]},
]


def _write(tmp_path, bad_line: str):
    path = tmp_path / "nb.jsonl"
    path.write_text("".join(json.dumps(o) + "\n" for o in GOOD) + bad_line + "\n", encoding="utf-8")
    return path


def test_round_trip(tmp_path):
    utts = [
        NBestUtterance("a", "the cat", (Hypothesis("the cat", -1.0), Hypothesis("the cap", -1.2, am_score=-3.0))),
        NBestUtterance("b", "dog", (Hypothesis("dog", -0.5, lm_score=-2.0),)),
    ]
    path = write_nbest(tmp_path / "sub" / "x.jsonl", utts)
    assert read_nbest(path) == utts
    assert not list(path.parent.glob(".*tmp"))  # atomic write leaves no temp files


def test_blank_lines_are_skipped(tmp_path):
    path = _write(tmp_path, "")
    path.write_text(path.read_text() + "\n\n")
    assert [u.utt_id for u in read_nbest(path)] == ["u1", "u2"]
    assert read_nbest(path)[1].nbest[0] == Hypothesis("", 0.0, am_score=-3.0, lm_score=-1.25)


@pytest.mark.parametrize(
    "bad,needle",
    [
        ('{"utt_id": "u3", "ref": "x", "nbest": [', "bad JSON"),
        ('["not", "an", "object"]', "expected a JSON object"),
        ('{"ref": "x", "nbest": [{"text": "x", "score": 1}]}', "missing field 'utt_id'"),
        ('{"utt_id": "u3", "nbest": [{"text": "x", "score": 1}]}', "missing field 'ref'"),
        ('{"utt_id": "u3", "ref": "x"}', "missing field 'nbest'"),
        ('{"utt_id": "u3", "ref": "x", "nbest": []}', "'nbest' is empty"),
        ('{"utt_id": "u3", "ref": "x", "nbest": {"text": "x"}}', "must be a list"),
        ('{"utt_id": "u3", "ref": "x", "nbest": [{"text": "x"}]}', "missing field 'score'"),
        ('{"utt_id": "u3", "ref": "x", "nbest": [{"score": -1}]}', "missing field 'text'"),
        ('{"utt_id": "u3", "ref": "x", "nbest": [{"text": "x", "score": "abc"}]}', "must be a number"),
        ('{"utt_id": "u3", "ref": "x", "nbest": [{"text": "x", "score": true}]}', "must be a number"),
        ('{"utt_id": "u3", "ref": "x", "nbest": [{"text": "x", "score": NaN}]}', "bad JSON"),
        ('{"utt_id": "u3", "ref": "x", "nbest": [{"text": "x", "score": 1e999}]}', "finite"),
        ('{"utt_id": "u3", "ref": "x", "nbest": [{"text": "x", "score": 1, "am_score": "z"}]}', "'am_score'"),
        ('{"utt_id": "u3", "ref": 7, "nbest": [{"text": "x", "score": 1}]}', "'ref' must be a string"),
        ('{"utt_id": "", "ref": "x", "nbest": [{"text": "x", "score": 1}]}', "'utt_id' must be a non-empty"),
        ('{"utt_id": "u1", "ref": "x", "nbest": [{"text": "x", "score": 1}]}', "duplicate utt_id 'u1'"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, bad, needle):
    path = _write(tmp_path, bad)
    with pytest.raises(DataError) as exc:
        read_nbest(path)
    msg = str(exc.value)
    assert "line 3" in msg, msg
    assert str(path) in msg
    assert needle in msg


def test_second_hypothesis_is_named(tmp_path):
    path = _write(tmp_path, '{"utt_id": "u3", "ref": "x", "nbest": [{"text": "x", "score": 1}, {"text": "y", "score": null}]}')
    with pytest.raises(DataError, match=r"line 3, hypothesis 2: 'score' must be a number"):
        read_nbest(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_nbest(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no utterances"):
        read_nbest(tmp_path / "empty.jsonl")


def test_kaldi_import(tmp_path):
    (tmp_path / "text").write_text("utt1-1 the cat\nutt1-2 the cap\nutt2-1 dog\n")
    (tmp_path / "costs").write_text("utt1-1 10.5\nutt1-2 11\nutt2-1 3\n")
    (tmp_path / "refs").write_text("utt1 the cat\nutt2 a dog\n")
    utts = read_kaldi_nbest(tmp_path / "text", tmp_path / "costs", tmp_path / "refs", costs=True)
    assert utts == [
        NBestUtterance("utt1", "the cat", (Hypothesis("the cat", -10.5), Hypothesis("the cap", -11.0))),
        NBestUtterance("utt2", "a dog", (Hypothesis("dog", -3.0),)),
    ]
    (tmp_path / "costs").write_text("utt1-1 10.5\nutt1-2 eleven\n")
    with pytest.raises(DataError, match="line 2"):
        read_kaldi_nbest(tmp_path / "text", tmp_path / "costs", tmp_path / "refs")
