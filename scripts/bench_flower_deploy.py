"""Round time of a real Flower deployment on loopback (cold ClientApp processes vs warm node workers) against the
in-process simulator, on the same recipe, in one run.

    python scripts/bench_flower_deploy.py recipes/chitchat_dp.yaml data.dir=/abs/chitchat rounds=4 \
        --nodes 2 --out /tmp/bench_deploy

Variants (run one after the other, fresh run dirs under --out): `inprocess` (the recipe's own threads), `deploy`
(flower-superlink + N flower-supernodes, each message in a fresh `flwr-clientapp` process that imports torch and
builds the trainer), `deploy_warm` (the same, each node forwarding to a `pflm node-worker`). Reported per variant:
the steady-state round time (mean of rounds after the first, from metrics.jsonl `seconds`) and its ratio to
in-process. Results also go to OUT/bench_deploy.json. Use absolute paths (the apps run in other directories).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from pflm.config import load_recipe
from pflm.errors import PflmError
from pflm.flower.loopback import deploy
from pflm.io_utils import atomic_write_json


def steady(run_dir: Path) -> dict:
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    if any("failed" in m for m in rounds):
        raise PflmError(f"{run_dir}: a round failed; see metrics.jsonl")
    secs = [float(m["seconds"]) for m in rounds]
    return {"round_seconds": secs, "steady_round_seconds": statistics.fmean(secs[1:] or secs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--node-threads", type=int, default=1)
    ap.add_argument("--variants", default="inprocess,deploy_warm,deploy")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    common = [*args.overrides, "server.eval_every=100000", f"flower.num_supernodes={args.nodes}",
              f"flower.cpus_per_client={args.node_threads}"]
    results: dict = {"recipe": args.recipe, "overrides": common, "nodes": args.nodes}
    for variant in args.variants.split(","):
        over = [*common, f"output_dir={out / variant / 'runs'}"]
        t0 = time.perf_counter()
        if variant == "inprocess":
            from pflm.simulation.simulator import Simulator

            cfg = load_recipe(args.recipe, over)
            Simulator(cfg).run(progress=False)
            run_dir = cfg.run_dir
        elif variant in ("deploy", "deploy_warm"):
            run_dir = deploy(args.recipe, [*over, "backend=flower"], args.nodes, out / variant / "work",
                             workers=variant == "deploy_warm", node_threads=args.node_threads, deadline_s=3600)
        else:
            raise SystemExit(f"unknown variant {variant!r}; use inprocess, deploy, deploy_warm")
        results[variant] = {**steady(run_dir), "wall_seconds": time.perf_counter() - t0}
        print(f"{variant:12s} steady round {results[variant]['steady_round_seconds']:.2f} s "
              f"(rounds {[round(s, 2) for s in results[variant]['round_seconds']]})", flush=True)
    if "inprocess" in results:
        base = results["inprocess"]["steady_round_seconds"]
        for v in ("deploy", "deploy_warm"):
            if v in results:
                results[v]["ratio_to_inprocess"] = results[v]["steady_round_seconds"] / base
                print(f"{v:12s} / inprocess = {results[v]['ratio_to_inprocess']:.2f}x")
    atomic_write_json(out / "bench_deploy.json", results)


if __name__ == "__main__":
    main()
