"""Resume safety: a run directory continues only under the recipe it was started with (up to harmless keys).

Changing the model, data, privacy settings, server optimizer or seed mid-run would continue the old model under
new settings, and the ε accounted so far (σ, q, clip bound) would no longer describe what the recipe says. Only
keys that do not change the experiment's releases may change on resume (rounds, unless the server lr decays over
them; cadence, threads, evaluation sizes, the backend); those changes are reported so the run records them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pflm.config import RecipeConfig, recipe_to_dict
from pflm.errors import PflmError

# Keys (dotted prefixes) that may differ when a run resumes: they change how long/how fast/where it runs or what it
# evaluates on held-out users, not what any round releases.
MAY_CHANGE = (
    "server.rounds", "server.eval_every", "server.checkpoint_every", "threads", "device_workers", "diagnostics",
    "output_dir", "backend", "flower.", "data.val_users", "data.test_users", "data.dir", "aggregation.secagg.threads",
    "logging.",
)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def recipe_changes(run_dir: Path, cfg: RecipeConfig, recipe_file: str) -> dict[str, list]:
    """{key: [old, new]} of the allowed changes against the run's recipe; PflmError listing any other change."""
    path = Path(run_dir) / recipe_file
    if not path.exists():
        return {}
    old, new = _flat(json.loads(path.read_text())), _flat(recipe_to_dict(cfg))
    # A key added to pflm after the run started is unchanged if the resumed recipe keeps its default.
    defaults = _flat(recipe_to_dict(RecipeConfig()))
    old.update({k: defaults[k] for k in new if k not in old and k in defaults})
    diff = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}
    refused = [k for k in diff if not any(k == p or (p.endswith(".") and k.startswith(p)) for p in MAY_CHANGE)]
    if "server.rounds" in diff and new.get("server.lr_schedule", "constant") != "constant":
        refused.append("server.rounds")  # the lr decays over the planned rounds: a new length would jump it
    if refused:
        shown = ", ".join(f"{k}: {diff[k][0]!r} → {diff[k][1]!r}" for k in refused[:6])
        more = f" (+{len(refused) - 6} more)" if len(refused) > 6 else ""
        raise PflmError(
            f"{run_dir} was started with a different recipe ({shown}{more}); resuming would continue the old model "
            "and budget under new settings — use name=NEW_NAME for a new run, or the original values"
        )
    return diff
