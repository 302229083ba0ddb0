"""`pflm audit` end to end on a tiny recipe: a sound DP pipeline passes (the ε lower bound stays below the formal ε),
and the same pipeline with its noise silently switched off — while it still reports the ε — is caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pflm.cli import main
from pflm.commands.audit import run_audit
from pflm.config import load_recipe
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"


@pytest.fixture(scope="module")
def wordfreq_data(tmp_path_factory) -> str:
    """Synthetic users over the public wordfreq vocabulary (3,000 words: it has the digits and 'my code is')."""
    from pflm.data.prepare import PrepareConfig, prepare
    from pflm.data.tokenizer import TokenizerConfig

    out = tmp_path_factory.mktemp("audit") / "synthetic_wf"
    prepare(PrepareConfig(out=str(out), corpus="synthetic", synthetic_users=120,
                          tokenizer=TokenizerConfig(vocab_size=3000, tokenizer_input="wordfreq")))
    return str(out)


def _audit(data: str, out: Path) -> dict:
    # A high sampling rate (90 of ~150 users) so that almost every inserted canary client takes part in 4 rounds.
    cfg = load_recipe(RECIPE, tiny_overrides(data, str(out), **{
        "server.rounds": 4, "server.cohort_size": 90, "privacy.noise_multiplier": "null",
        "privacy.target_epsilon": 1.0, "server.eval_every": 4}))
    return run_audit(cfg, out, canaries=8, repeats=8, clients=96, space_name="pin")


def test_sound_dp_pipeline_passes_and_the_bound_stays_below_epsilon(wordfreq_data: str, tmp_path: Path) -> None:
    r = _audit(wordfreq_data, tmp_path / "a")
    formal = r["formal"]["epsilon"]
    assert 0.99 <= formal <= 1.0 and r["formal"]["what"] == "epsilon of the run"
    assert r["empirical_epsilon_lower_bound"]["value"] <= formal
    assert r["verdict"] == "pass"
    assert r["one_run_epsilon_final_model"]["epsilon_low"] <= formal
    # The canaries went through cohort sampling like everyone: the population counts them.
    assert r["run"]["population"] == 96 + 4 + 48
    assert sum(p > 0 for p in r["canaries"]["client_participations"]) >= 40
    assert r["run"]["reproducible"] is True  # labelled: the canaries are seed-derived in this mode
    written = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert written["verdict"] == "pass" and set(written["meaning"]) >= {"verdict", "exposure", "rescoring"}
    from pflm.commands.audit_plot import plot_exposure

    plot_exposure(r, tmp_path / "cmp.png", other=written)  # the --compare picture
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The secret canaries are only in audit.json, never in the run's released files.
    phrase = r["canaries"]["sentences_inserted"][0]["phrase"]
    for f in ("metrics.jsonl", "summary.json"):
        assert phrase not in (tmp_path / "a" / "run" / f).read_text()


def test_noise_switched_off_while_epsilon_is_reported_is_caught(wordfreq_data: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The broken pipeline: the noise postprocessor returns the aggregate untouched, the accountant still charges
    ε = 1. The canary clients' directions then stand out in the model and the audit must refute the claim."""
    from pflm.privacy.noise import GaussianNoisePostprocessor

    monkeypatch.setattr(GaussianNoisePostprocessor, "on_server", lambda self, agg, ctx: (agg, {}))
    r = _audit(wordfreq_data, tmp_path / "b")
    assert r["formal"]["epsilon"] <= 1.0  # still claimed
    assert r["verdict"] == "fail"
    assert r["empirical_epsilon_lower_bound"]["value"] > r["formal"]["epsilon"]
    assert r["one_run_epsilon_final_model"]["epsilon_low"] > 10


def test_audit_refuses_bad_input_with_one_line(wordfreq_data: str, private_synthetic_data: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    base = ["audit", RECIPE, f"data.dir={wordfreq_data}", f"output_dir={tmp_path}", "--no-progress"]
    cases = [
        (["--canaries", "5"], "must be even numbers"),
        (["--space", "ssn"], "unknown canary space"),
        (["peu.mode=topk", "peu.k=64"], "peu.mode=all"),
        (["data.max_sentences_per_device=4", "--repeats", "10"], "exceeds data.max_sentences_per_device=4"),
        (["--users-per-canary", "0"], "must be >= 1"),
        ([f"data.dir={private_synthetic_data}", "--space", "phone"], "lacks"),
    ]
    for i, (extra, msg) in enumerate(cases):
        assert main([*base, "--out", str(tmp_path / f"x{i}"), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "audit.json").write_text("{}")
    assert main([*base, "--out", str(tmp_path / "used")]) == 2
    assert "already holds an audit" in capsys.readouterr().err
