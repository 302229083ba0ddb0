"""Writes a run's published files: the model, recipe, tokenizer and release-safe data manifest (read by `pflm.evaluation.run_model`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from pflm.config import RecipeConfig, recipe_to_dict
from pflm.evaluation.run_model import DATA_INFO_FILE, MODEL_FILE, RECIPE_FILE, TOKENIZER_FILE
from pflm.io_utils import atomic_write_json


def write_run_metadata(run_dir: Path, cfg: RecipeConfig, tokenizer_path: str, manifest: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / RECIPE_FILE, recipe_to_dict(cfg))
    atomic_write_json(run_dir / DATA_INFO_FILE, manifest)
    tmp = run_dir / f".{TOKENIZER_FILE}.tmp"
    shutil.copyfile(tokenizer_path, tmp)
    tmp.replace(run_dir / TOKENIZER_FILE)


LAST_ITERATE_FILE = "model-last-iterate.safetensors"  # beside MODEL_FILE when that is the iterate average


def export_model(run_dir: Path, model: torch.nn.Module, name: str = MODEL_FILE) -> None:
    tmp = run_dir / f".{name}.tmp"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(run_dir / name)
