"""Lists imports between pflm's top-level packages that go against the pipeline order (and counts all of them).

Order, lowest first: data → model → device → aggregator/privacy → server → evaluation → driver →
backends (simulation, flower) → commands/cli. Shared modules (errors, config, round, runtime, secure_random, …)
sit below everything. Run: python scripts/check_layers.py  (exit 1 if any import goes upward).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

LEVEL = {"data": 1, "model": 2, "device": 3, "aggregator": 4, "privacy": 4, "server": 5, "evaluation": 6,
         "driver": 7, "simulation": 8, "flower": 8, "commands": 9, "cli": 9, "__main__": 10}


def stage(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "pflm" or len(parts) < 2:
        return None
    return parts[1] if parts[1] in LEVEL else None  # shared modules have no stage


def main() -> int:
    root = Path(__file__).resolve().parents[1]
    cross, bad = 0, []
    for path in sorted((root / "pflm").rglob("*.py")):
        src = stage(".".join(path.relative_to(root).with_suffix("").parts))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                dst = stage(node.module)
            elif isinstance(node, ast.Import):
                dst = next((stage(a.name) for a in node.names if stage(a.name)), None)
            else:
                continue
            if src is None or dst is None or dst == src:
                continue
            cross += 1
            if LEVEL[dst] > LEVEL[src] and not {src, dst} <= {"simulation", "flower"}:
                bad.append(f"{path.relative_to(root)}:{node.lineno}: {src} imports {dst}")
            if {src, dst} == {"simulation", "flower"}:
                bad.append(f"{path.relative_to(root)}:{node.lineno}: backend {src} imports backend {dst}")
    print(f"{cross} cross-stage imports, {len(bad)} against the pipeline order")
    for line in bad:
        print(line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
