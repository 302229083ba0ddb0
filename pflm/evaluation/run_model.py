"""Loads a finished run's published model (weights + recipe + tokenizer + manifest) without its data directory."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file

from pflm.config import RecipeConfig
from pflm.schema import from_dict
from pflm.errors import PflmError

MODEL_FILE = "model.safetensors"
RECIPE_FILE = "recipe.json"
TOKENIZER_FILE = "tokenizer.model"
DATA_INFO_FILE = "data_manifest.json"


def load_run_model(run_dir: str | Path):
    """(model in eval mode, RecipeConfig, tokenizer path, data manifest) of a finished `pflm train` run."""
    from pflm.model.factory import build_model

    run_dir = Path(run_dir)
    for f in (MODEL_FILE, RECIPE_FILE, TOKENIZER_FILE, DATA_INFO_FILE):
        if not (run_dir / f).exists():
            raise PflmError(f"{run_dir} is not a finished pflm train run ({f} missing); train it first or pass its run directory")
    cfg = from_dict(RecipeConfig, json.loads((run_dir / RECIPE_FILE).read_text()))
    manifest = json.loads((run_dir / DATA_INFO_FILE).read_text())
    state = load_file(str(run_dir / MODEL_FILE))
    vocab = int(manifest["tokenizer"]["vocab_size"]) if "tokenizer" in manifest else int(manifest["vocab_size"])
    model = build_model(cfg.model, vocab)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, cfg, str(run_dir / TOKENIZER_FILE), manifest
