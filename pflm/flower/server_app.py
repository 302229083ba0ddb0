"""Flower ServerApp: pflm's run driver (sampling, PEU, aggregation, DP, accounting) with the `FlowerNodes` fan-out.

`flower_driver(cfg, grid)` is the same `RunDriver` as the in-process backend, with its devices on Flower
SuperNodes: resume, checkpoints, metrics.jsonl, evaluation and summary.json are the driver's own code, so both
backends write the same artifacts.

DP and aggregation stay in pflm rather than in Flower's strategies and mods: Flower's DP mods reject replies
whose array keys differ from what was sent (PEU sends a different row set every round), and Flower's SecAgg+
only exists on the legacy API with 32-bit mask seeds (see docs/flower.md).
"""

from __future__ import annotations

import shlex
from logging import INFO

from flwr.app import Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from pflm.config import RecipeConfig, load_recipe
from pflm.driver.run import RunDriver
from pflm.flower.nodes import DEFAULT_NODE_WAIT, DEFAULT_ROUND_TIMEOUT, FlowerNodes


def flower_driver(cfg: RecipeConfig, grid: Grid, round_timeout: float = DEFAULT_ROUND_TIMEOUT,
                  node_wait: float = DEFAULT_NODE_WAIT) -> RunDriver:
    """The recipe's run driver with its devices on the SuperNodes reachable through `grid`."""
    return RunDriver(cfg, FlowerNodes(grid, round_timeout, node_wait))


def recipe_from_run_config(run_config: dict) -> RecipeConfig:
    """Deployment: the recipe path and `k=v` overrides come from the Flower run config."""
    path = str(run_config.get("recipe", "") or "") or None
    overrides = shlex.split(str(run_config.get("overrides", "") or ""))
    return load_recipe(path, overrides + ["backend=flower"])


def build_server_app(cfg: RecipeConfig | None = None, result: dict | None = None, progress: bool = False) -> ServerApp:
    """A ServerApp for `cfg` (simulation, same process) or for the recipe named in the run config (deployment).

    The run's summary dict is copied into `result` when given (it is always written to RUN_DIR/summary.json).
    """
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        rc = context.run_config
        recipe = cfg if cfg is not None else recipe_from_run_config(rc)
        sim = flower_driver(
            recipe, grid,
            round_timeout=float(rc.get("round-timeout", DEFAULT_ROUND_TIMEOUT)),
            node_wait=float(rc.get("node-wait", DEFAULT_NODE_WAIT)),
        )
        log(INFO, "[pflm] run %s → %s", recipe.name, recipe.run_dir.resolve())
        summary = sim.run(progress=progress or bool(rc.get("progress", False)))
        if result is not None:
            result.update(summary)

    return server_app


app = build_server_app()
