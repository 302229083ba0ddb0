"""A trained run's exported model: weights + recipe + tokenizer + normalisation, loadable without the data dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pflm.config import RecipeConfig, recipe_to_dict
from pflm.config_base import from_dict
from pflm.errors import PflmError
from pflm.io_utils import atomic_write_json

MODEL_FILE = "model.safetensors"
RECIPE_FILE = "recipe.json"
TOKENIZER_FILE = "tokenizer.model"
DATA_INFO_FILE = "data_manifest.json"


def write_run_metadata(run_dir: Path, cfg: RecipeConfig, tokenizer_path: str, manifest: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / RECIPE_FILE, recipe_to_dict(cfg))
    atomic_write_json(run_dir / DATA_INFO_FILE, manifest)
    tmp = run_dir / f".{TOKENIZER_FILE}.tmp"
    shutil.copyfile(tokenizer_path, tmp)
    tmp.replace(run_dir / TOKENIZER_FILE)


def export_model(run_dir: Path, model: torch.nn.Module) -> None:
    tmp = run_dir / f".{MODEL_FILE}.tmp"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(run_dir / MODEL_FILE)


def load_run_model(run_dir: str | Path):
    """(model in eval mode, RecipeConfig, tokenizer path, data manifest) of a finished `pflm train` run."""
    from pflm.device.trainer import build_device_model

    run_dir = Path(run_dir)
    for f in (MODEL_FILE, RECIPE_FILE, TOKENIZER_FILE, DATA_INFO_FILE):
        if not (run_dir / f).exists():
            raise PflmError(f"{run_dir} is not a finished pflm train run ({f} missing); train it first or pass its run directory")
    cfg = from_dict(RecipeConfig, json.loads((run_dir / RECIPE_FILE).read_text()))
    manifest = json.loads((run_dir / DATA_INFO_FILE).read_text())
    state = load_file(str(run_dir / MODEL_FILE))
    vocab = int(manifest["tokenizer"]["vocab_size"]) if "tokenizer" in manifest else int(manifest["vocab_size"])
    model = build_device_model(cfg, vocab)
    model.load_state_dict(state, strict=True)
    model.eval()
    return model, cfg, str(run_dir / TOKENIZER_FILE), manifest
