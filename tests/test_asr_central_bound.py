"""scripts/asr_central_bound.py (the NON-PRIVATE upper bound of issue 20) labels its output as not private and
learns; the rescoring score cache follows a run's weights instead of its path."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from pflm.evaluation.lm_scorer import load_scorer
from pflm.evaluation.rescore_systems import privacy_label

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_central_bound_learns_and_says_it_is_not_private(synthetic_data, tmp_path):
    out = tmp_path / "bound"
    rc = _load("asr_central_bound").main([
        "--recipe", str(ROOT / "recipes" / "tiny_synthetic.yaml"), "--data", synthetic_data, "--out", str(out),
        "--epochs", "2", "model.embedding_dim=16", "model.hidden_dim=32"])
    assert rc == 0
    assert (out / "NOT-PRIVATE.txt").read_text().startswith("NOT PRIVATE")
    assert privacy_label(out).startswith("NON-PRIVATE")
    info = json.loads((out / "bound.json").read_text())
    assert info["best_val_word_perplexity"] < 0.7 * info["history"][0]["val_word_perplexity"]
    scorer = load_scorer(str(out), oov_scoring="public")  # the output is a run directory the rescorers read
    assert all(s < 0 for s in scorer.score(["what is the weather", "call mom"]))


class _Counting:
    def __init__(self, value: float) -> None:
        self.value, self.calls = value, 0

    def normalize(self, text: str) -> str:
        return text

    def score(self, texts: list[str]) -> list[float]:
        self.calls += len(texts)
        return [self.value] * len(texts)


def test_score_cache_is_dropped_when_the_weights_change(tmp_path):
    results = _load("asr_results")
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"first weights")
    first = _Counting(-1.0)
    assert results.run_scorer(first, tmp_path / "cache", run).score(["a b"]) == [-1.0]
    again = _Counting(-9.0)
    assert results.run_scorer(again, tmp_path / "cache", run).score(["a b"]) == [-1.0] and again.calls == 0
    (run / "model.safetensors").write_bytes(b"retrained in place")
    retrained = _Counting(-2.0)
    assert results.run_scorer(retrained, tmp_path / "cache", run).score(["a b"]) == [-2.0] and retrained.calls == 1
