"""Weights pretrained centrally on PUBLIC text (`pflm pretrain`), with the provenance that lets a DP run start from them.

A federated run may start from such weights (recipe key `server.init_from`) only if the file next to them,
`pretrain.json`, says they were trained on public data alone (`"data": "public"`) with the very tokenizer the run
uses: weights fitted to the users' own text would leak that text outside the run's epsilon.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from pflm.errors import ConfigError

PROVENANCE_FILE = "pretrain.json"
WEIGHTS_FILE = "model.safetensors"


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def is_public_pretrain(directory: str | Path) -> bool:
    """True if `directory` holds a `pretrain.json` that says its weights were trained on public data only."""
    prov = Path(directory) / PROVENANCE_FILE
    return prov.is_file() and json.loads(prov.read_text()).get("data") == "public"


def read_provenance(weights: str | Path) -> dict[str, Any]:
    """The `pretrain.json` beside `weights`; refuses weights without public provenance."""
    weights = Path(weights)
    prov = weights.parent / PROVENANCE_FILE
    if not weights.is_file():
        raise ConfigError(f"server.init_from {weights} not found; point it at the model.safetensors `pflm pretrain` wrote")
    if not prov.is_file():
        raise ConfigError(f"server.init_from {weights} has no {PROVENANCE_FILE} beside it; only weights written by "
                          "`pflm pretrain` on a public corpus can start a run")
    info = json.loads(prov.read_text())
    if info.get("data") != "public":
        raise ConfigError(f"{prov} says data={info.get('data')!r}; a run may only start from weights trained on public data")
    return info


def check_public_weights(weights: str | Path, tokenizer_sha256: str | None) -> dict[str, Any]:
    """The provenance of `weights` if a run with this tokenizer may start from them (public data, same
    tokenizer); a ConfigError otherwise. Cheap: the run driver calls it before it writes anything."""
    info = read_provenance(weights)
    if tokenizer_sha256 is not None and info.get("tokenizer_sha256") != tokenizer_sha256:
        raise ConfigError(f"server.init_from {weights} was pretrained with another tokenizer; pretrain again with "
                          "`pflm pretrain --data` on this run's data directory")
    return info


@torch.no_grad()
def load_pretrained(model: torch.nn.Module, weights: str | Path, tokenizer_sha256: str | None) -> dict[str, Any]:
    """Copy public pretrained weights into `model` (same architecture and tokenizer); returns the provenance."""
    from safetensors.torch import load_file

    info = check_public_weights(weights, tokenizer_sha256)
    state = load_file(str(weights))
    own = model.state_dict()
    # LoRA adapters are new parameters of the fine-tuning run: they keep their own initialisation
    wrong = sorted(k for k in own if (k not in state and "lora" not in k) or (k in state and state[k].shape != own[k].shape))
    if wrong:
        raise ConfigError(f"server.init_from {weights} does not match the recipe's model ({', '.join(wrong[:3])} differ); "
                          "pretrain with the same model.* settings")
    model.load_state_dict({k: state.get(k, v) for k, v in own.items()}, strict=True)
    return info


def manifest_tokenizer_sha256(data_dir: str | Path) -> str | None:
    """The tokenizer hash a `pflm prepare` manifest records (None when the directory has no manifest)."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("tokenizer", {}).get("sha256")
