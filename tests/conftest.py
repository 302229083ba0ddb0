"""Shared fixtures: a small synthetic voice-assistant dataset prepared once per test session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> str:
    from pflm.data.prepare import PrepareConfig, prepare
    from pflm.data.tokenizer import TokenizerConfig

    out = tmp_path_factory.mktemp("data") / "synthetic"
    prepare(PrepareConfig(out=str(out), corpus="synthetic", synthetic_users=120, tokenizer=TokenizerConfig(vocab_size=300)))
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
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
