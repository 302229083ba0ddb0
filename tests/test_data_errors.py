"""Bad input to `pflm prepare`: one-line DataError, exit code 2, and no output or temp directory left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pflm.cli import main
from pflm.data.load import check_utf8, load_table
from pflm.errors import DataError


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(users: int, per_user: int = 6) -> list[dict]:
    return [{"user_id": f"u{u}", "text": f"hello number {k} from person {u}"}
            for u in range(users) for k in range(per_user)]


def _run_cli(capfd: pytest.CaptureFixture[str], tmp_path: Path, args: list[str]) -> tuple[int, str]:
    out = tmp_path / "out"
    before = set(os.listdir(tmp_path))
    rc = main(["prepare", *args, "--out", str(out)])
    captured = capfd.readouterr()
    assert not out.exists(), "a failed prepare must not leave the output directory"
    assert set(os.listdir(tmp_path)) == before, "a failed prepare must not leave temp directories"
    return rc, captured.err


def _assert_one_line(rc: int, err: str, *needles: str) -> None:
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pflm prepare: error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def test_missing_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    rc, err = _run_cli(capfd, tmp_path, ["--input", str(tmp_path / "nope.jsonl"), "--user-column", "user_id"])
    _assert_one_line(rc, err, "not found", "nope.jsonl")


def test_unknown_column_lists_available(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    src = _jsonl(tmp_path / "d.jsonl", _rows(20))
    rc, err = _run_cli(capfd, tmp_path, ["--input", str(src), "--user-column", "speaker"])
    _assert_one_line(rc, err, "'speaker'", "available columns: user_id, text")
    rc, err = _run_cli(capfd, tmp_path, ["--input", str(src), "--text-column", "body", "--user-column", "user_id"])
    _assert_one_line(rc, err, "'body'", "--text-column")


def test_empty_corpus(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, err = _run_cli(capfd, tmp_path, ["--input", str(empty), "--user-column", "user_id"])
    _assert_one_line(rc, err, "empty")
    empty.unlink()
    punct = _jsonl(tmp_path / "punct.jsonl", [{"user_id": "a", "text": "?!..."}] * 5)
    rc, err = _run_cli(capfd, tmp_path, ["--input", str(punct), "--user-column", "user_id"])
    _assert_one_line(rc, err, "empty after normalisation")


def test_non_utf8_names_file_and_offset(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    good = b'{"user_id": "a", "text": "caf\xc3\xa9"}\n'
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(good * 3 + b'{"user_id": "b", "text": "caf\xe9"}\n')
    offset = len(good) * 3 + len(b'{"user_id": "b", "text": "caf')
    rc, err = _run_cli(capfd, tmp_path, ["--input", str(bad), "--user-column", "user_id"])
    _assert_one_line(rc, err, "latin1.jsonl", f"byte offset {offset}", "UTF-8")


def test_non_utf8_offset_across_chunks(tmp_path: Path) -> None:
    f = tmp_path / "big.txt"
    # a 2-byte character split across the 1 MiB read boundary, then a bad byte further on
    data = b"a" * ((1 << 20) - 1) + "\u00e9".encode() + b"b" * 10 + b"\xff"
    f.write_bytes(data)
    with pytest.raises(DataError, match=f"byte offset {len(data) - 1} "):
        check_utf8(f)


def test_vocab_larger_than_data(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    src = _jsonl(tmp_path / "d.jsonl", _rows(20))
    rc, err = _run_cli(capfd, tmp_path, ["--input", str(src), "--user-column", "user_id", "--vocab-size", "5000"])
    # train users' words: hello number from person, 0..5 and 16 of the 20 user numbers
    _assert_one_line(rc, err, "larger than the data supports", "--vocab-size")
    rc, err = _run_cli(capfd, tmp_path, ["--input", str(src), "--user-column", "user_id", "--vocab-size", "5000",
                                         "--model-type", "unigram"])
    _assert_one_line(rc, err, "vocab size 5000", "max ")


def test_split_with_zero_users(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    src = _jsonl(tmp_path / "d.jsonl", _rows(4))
    rc, err = _run_cli(capfd, tmp_path, ["--input", str(src), "--user-column", "user_id"])
    _assert_one_line(rc, err, "zero users")
    rc, err = _run_cli(capfd, tmp_path, ["--input", str(src), "--user-column", "user_id", "--min-sentences", "50"])
    _assert_one_line(rc, err, "--min-sentences")


def test_existing_output_needs_overwrite(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    rc = main(["prepare", "--corpus", "synthetic", "--num-users", "30", "--vocab-size", "100", "--out", str(out)])
    err = capfd.readouterr().err
    _assert_one_line(rc, err, "already exists", "--overwrite")
    assert (out / "keep.txt").exists()
    rc = main(["prepare", "--corpus", "synthetic", "--num-users", "30", "--vocab-size", "100", "--out", str(out),
               "--overwrite"])
    printed = capfd.readouterr().out
    assert rc == 0 and (out / "manifest.json").exists() and not (out / "keep.txt").exists()
    assert "train" in printed and "sentences" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_csv_tsv_txt_and_bad_suffix(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("who,said\nx,Hello there\ny,Good night\n")
    ds = load_table(str(tmp_path / "a.csv"), "said", "who")
    assert ds.column_names == ["text", "user"] and ds["text"][0] == "Hello there"
    (tmp_path / "b.tsv").write_text("who\tsaid\nx\tHi, you\n")
    assert load_table(str(tmp_path / "b.tsv"), "said", "who")["text"][0] == "Hi, you"
    (tmp_path / "c.txt").write_text("one line\nanother line\n")
    assert load_table(str(tmp_path / "c.txt"))["text"] == ["one line", "another line"]
    with pytest.raises(DataError, match="no user column"):
        load_table(str(tmp_path / "c.txt"), user_column="user")
    (tmp_path / "d.xml").write_text("<a/>")
    with pytest.raises(DataError, match="unsupported file type .xml"):
        load_table(str(tmp_path / "d.xml"))


def test_cli_subprocess_prints_exactly_one_line(tmp_path: Path) -> None:
    """At the process level (C libraries included) a failure is one stderr line and exit code 2."""
    src = _jsonl(tmp_path / "d.jsonl", _rows(20))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "pflm", "prepare", "--input", str(src), "--user-column", "user_id",
                        "--model-type", "bpe", "--vocab-size", "9000", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "vocab size 9000" in p.stderr
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d.jsonl"]


def test_prepare_cleans_what_a_killed_prepare_left(tmp_path):
    """Issue 22: kill -9 during `pflm prepare` leaves a hidden .NAME.*.tmp directory; the next prepare removes it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "synth"
    cmd = [sys.executable, "-m", "pflm", "prepare", "--corpus", "synthetic", "--num-users", "3000",
           "--vocab-size", "300", "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".synth.*.tmp")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".synth.*.tmp")), "prepare finished or never started its temp dir; the test proves nothing"
    small = [*cmd[:7], "200", *cmd[8:]]  # --num-users 200
    subprocess.run(small, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synth"]
