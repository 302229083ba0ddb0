"""Crash-safe checkpoints: safetensors for tensors, a JSON pointer (with the tensors' SHA-256) written last.

A checkpoint is visible only once both files are complete (temp file + fsync + rename), so `kill -9` at any
moment leaves either the previous checkpoint or the new one, never a torn one. A file that fails its hash is
reported as corrupt instead of being silently loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pflm.errors import PflmError
from pflm.io_utils import atomic_write_json

POINTER = "checkpoint.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(run_dir: Path, round_idx: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write the checkpoint of round `round_idx`; on a full disk or an unwritable directory the previous
    checkpoint stays the valid one and a PflmError says what to fix."""
    name = f"checkpoint-{round_idx:06d}.safetensors"
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        atomic_write_json(run_dir / POINTER, {"round": round_idx, "file": name, "sha256": _sha256(final), "meta": meta})
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if final.exists() and not _points_to(run_dir, name):
            final.unlink(missing_ok=True)
        raise PflmError(
            f"could not write the checkpoint of round {round_idx} in {run_dir} ({e.strerror or e}); the previous "
            "checkpoint is intact: free disk space or make the directory writable, then rerun the same command"
        ) from None
    for old in run_dir.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return final


def _points_to(run_dir: Path, name: str) -> bool:
    try:
        return json.loads((run_dir / POINTER).read_text()).get("file") == name
    except (OSError, ValueError):
        return False


def load_checkpoint(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, meta) of the latest checkpoint, None if the run has none; PflmError if it is corrupt."""
    ptr = run_dir / POINTER
    if not ptr.exists():
        return None
    try:
        info = json.loads(ptr.read_text())
        path = run_dir / info["file"]
        expected = info["sha256"]
    except (ValueError, KeyError, TypeError):
        raise PflmError(f"checkpoint pointer {ptr} is corrupt; delete {run_dir} to start over") from None
    if not path.exists():
        raise PflmError(f"checkpoint {path} is missing; delete {run_dir} to start over")
    if _sha256(path) != expected:
        raise PflmError(f"checkpoint {path} is corrupt (SHA-256 mismatch); delete {run_dir} to start over")
    try:
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises several types for damaged files
        raise PflmError(f"checkpoint {path} cannot be read ({e}); delete {run_dir} to start over") from None
    return tensors, info["meta"]
