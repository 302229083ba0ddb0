"""Real N-best generation: flite synthesis + pocketsphinx decoding of two short sentences, then a cache hit."""

import math
import shutil

import pytest

import pflm.evaluation.asr_nbest as nbest_mod
from pflm.evaluation.asr_nbest import GenerationConfig, default_normalize, generate_nbest, generate_nbest_with_stats
from pflm.cli import main
from pflm.errors import ConfigError
from pflm.evaluation.nbest import read_nbest
from pflm.evaluation.wer import errors_batch

SENTENCES = [("s1", "What do you like to do?"), ("s2", "I haven't seen you on here before.")]
needs_tools = pytest.mark.skipif(
    shutil.which("flite") is None or shutil.which("sox") is None,
    reason="flite/sox binaries missing (scripts/setup.sh installs them: apt-get install -y flite sox)",
)


def test_default_normalize():
    assert default_normalize("I haven't  seen YOU, 'ok'?") == "i haven't seen you ok"
    assert default_normalize("Don\u2019t -- stop!!") == "don't stop"
    assert default_normalize("rock'n'roll's_fine") == "rock'n'roll's fine"


def test_config_validation():
    with pytest.raises(ConfigError, match="voice"):
        GenerationConfig(voice="nope")
    with pytest.raises(ConfigError, match="nbest"):
        GenerationConfig(nbest=0)


@needs_tools
def test_generate_decode_and_cache(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    out, stats = generate_nbest_with_stats(SENTENCES, tmp_path / "nb.jsonl", voice="slt", nbest=5, cache_dir=cache, workers=2)
    assert (stats.decoded, stats.cached) == (2, 0)
    assert stats.audio_seconds > 1.0
    utts = read_nbest(out)  # the strict reader accepts the output
    assert [u.utt_id for u in utts] == ["s1", "s2"]
    assert [u.ref for u in utts] == ["what do you like to do", "i haven't seen you on here before"]
    for u in utts:
        assert 1 <= len(u.nbest) <= 5
        texts = [h.text for h in u.nbest]
        assert len(set(texts)) == len(texts)  # unique after normalization
        scores = [h.score for h in u.nbest]
        assert scores == sorted(scores, reverse=True) and all(math.isfinite(s) and s <= 0 for s in scores)
        assert all(h.text == default_normalize(h.text) for h in u.nbest)
    # the recognizer really heard the sentences: clear synthetic speech is mostly right in the best hypothesis
    errs = errors_batch([u.ref for u in utts], [u.nbest[0].text for u in utts])
    assert sum(e for e, _ in errs) / sum(n for _, n in errs) < 0.5

    first = out.read_text()
    # second call: served from the cache, nothing is synthesized or decoded
    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although cached")

    with monkeypatch.context() as m:
        m.setattr(nbest_mod, "_work", no_decoding)
        m.setattr(nbest_mod, "_run_parallel", no_decoding)
        out2, stats2 = generate_nbest_with_stats(SENTENCES, tmp_path / "nb2.jsonl", nbest=5, cache_dir=cache)
    assert (stats2.decoded, stats2.cached) == (0, 2)
    assert out2.read_text() == first
    # a different voice is a different cache key
    _, stats3 = generate_nbest_with_stats(SENTENCES[:1], tmp_path / "nb3.jsonl", voice="kal16", nbest=5, cache_dir=cache, workers=1)
    assert stats3.decoded == 1

    # the CLI over a sentences file reuses the same cache and ends with the WER lines
    (tmp_path / "s.txt").write_text("".join(t + "\n" for _, t in SENTENCES))
    assert main(["nbest", "--sentences", str(tmp_path / "s.txt"), "--nbest", "5", "--cache-dir", str(cache),
                 "--out", str(tmp_path / "cli.jsonl")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "2 cached, 0 decoded" in lines[0]
    assert lines[-2].startswith("first_pass_wer: ") and lines[-1].startswith("oracle_wer: ")
    assert [u.ref for u in read_nbest(tmp_path / "cli.jsonl")] == [u.ref for u in utts]


@needs_tools
def test_custom_normalizer_applies_to_refs_and_hyps(tmp_path):
    out = generate_nbest(SENTENCES[:1], tmp_path / "nb.jsonl", nbest=3, cache_dir=tmp_path / "c",
                         normalize=lambda s: s.upper().strip(), workers=1)
    u = read_nbest(out)[0]
    assert u.ref == "WHAT DO YOU LIKE TO DO?"
    assert all(h.text == h.text.upper() for h in u.nbest)


def test_default_normalizer_is_the_data_pipelines():
    from pflm.evaluation.asr_nbest import resolve_normalize
    from pflm.data.normalize import Normalizer

    norm = resolve_normalize(None)
    assert isinstance(norm, Normalizer)
    for s in ["I haven't  seen YOU, 'ok'?", "Don\u2019t -- stop!!", "rock'n'roll's fine"]:
        assert norm(s) == default_normalize(s)
