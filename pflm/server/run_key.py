"""The run's secret key: drawn once from the OS CSPRNG, kept owner-only in the run directory, reused on resume.

Everything a DP guarantee depends on — central noise, cohort sampling, simulated devices' local randomness
— is derived from this key (`pflm.secure_random.subkey`). It never leaves the server: it is not in
recipe.json, summary.json, metrics or the model, and Flower nodes never receive it. Keeping it with the
checkpoint makes a resumed run redo exactly the same releases. `privacy.reproducible=true` derives it from the
public seed instead (research runs; the guarantee then does not hold against anyone who knows the seed).
"""

from __future__ import annotations

import stat
from pathlib import Path

from pflm.errors import PflmError
from pflm.io_utils import atomic_write_bytes
from pflm.secure_random import KEY_BYTES, derive_key, new_key

KEY_FILE = "SECRET-run-key.bin"  # never publish: whoever holds it can subtract the noise


def load_or_create_run_key(run_dir: Path, reproducible: bool, seed: int) -> bytes:
    """The run key: HKDF(seed) in reproducible mode, else the key file (created with mode 0600 if missing)."""
    if reproducible:
        return derive_key(seed)
    path = Path(run_dir) / KEY_FILE
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise PflmError(f"{path} is readable by other users (mode {mode:o}); run `chmod 600 {path}`")
        key = path.read_bytes()
        if len(key) != KEY_BYTES:
            raise PflmError(f"{path} is corrupt ({len(key)} bytes, expected {KEY_BYTES}); delete {run_dir} to start over")
        return key
    key = new_key()
    atomic_write_bytes(path, key)  # mkstemp creates the file with mode 0600 (owner-only)
    return key
