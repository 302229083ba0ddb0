"""Shared fixtures: a small synthetic voice-assistant dataset prepared once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def private_synthetic_data(tmp_path_factory) -> str:
    """Synthetic users whose vocabulary and prior are counted on the training users themselves (private):
    non-DP runs may use them, DP runs must refuse them."""
    from pflm.data.prepare import PrepareConfig, prepare
    from pflm.data.tokenizer import TokenizerConfig

    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare(PrepareConfig(out=str(out), corpus="synthetic", synthetic_users=120, tokenizer=TokenizerConfig(vocab_size=300)))
    return str(out)


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> str:
    """Synthetic users whose vocabulary and prior come from a *public* proxy corpus (other generated users,
    never the training users): the data DP recipes accept, and what most tests train on."""
    from pflm.data.corpora.synthetic import generate
    from pflm.data.prepare import PrepareConfig, prepare
    from pflm.data.tokenizer import TokenizerConfig

    root = tmp_path_factory.mktemp("public")
    proxy = root / "public_corpus.txt"
    proxy.write_text("\n".join(generate(150, seed=12345)["text"]) + "\n")
    out = root / "synthetic"
    prepare(PrepareConfig(out=str(out), corpus="synthetic", synthetic_users=120,
                          tokenizer=TokenizerConfig(vocab_size=300, tokenizer_input=str(proxy))))
    return str(out)


def tiny_overrides(data_dir: str, out_dir: str, **extra) -> list[str]:
    """Overrides that make recipes/tiny_synthetic.yaml run in a couple of seconds."""
    base = {
        "data.dir": data_dir,
        "output_dir": out_dir,
        "model.embedding_dim": 16,
        "model.hidden_dim": 32,
        "server.rounds": 3,
        "server.cohort_size": 5,
        "threads": 1,
        # Deterministic test runs: comparisons between two runs (backends, worker counts, resume) need the
        # seed-derived key. Tests of the default secret-key behaviour set privacy.reproducible=false.
        "privacy.reproducible": "true",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def crash_at_round(sim, monkeypatch, round_idx: int) -> None:
    """Run `sim` until round `round_idx` raises (a simulated crash, like a SIGKILL between rounds)."""
    real = sim.run_round

    def crash(r):
        if r == round_idx:
            raise RuntimeError("simulated crash")
        return real(r)

    monkeypatch.setattr(sim, "run_round", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        sim.run(progress=False)
