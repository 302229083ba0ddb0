"""Round time and simulated devices per second: in-process simulator vs Flower simulation, same recipe and seed.

    python scripts/bench_flower.py recipes/chitchat_fl.yaml data.dir=/tmp/flower_cc rounds=3 --out /tmp/flower_bench

Runs the recipe once per backend (fresh run dirs under --out), reads each run's metrics.jsonl and prints, per
backend, the steady-state round time (mean over rounds after the first, which includes Flower's actor
warm-up and the trainer build), devices per second (cohort / round time) and the whole wall time (with
Ray start-up and evaluation). Results go to OUT/bench.json as well. Noise: run it on a quiet machine; on a
shared one, repeat and compare medians.
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
from pflm.io_utils import atomic_write_json


def _stats(run_dir: Path, cohort: int, wall: float) -> dict:
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    bad = [m["round"] for m in rounds if "failed" in m or m.get("contributors") != cohort]
    if bad:  # a round without the whole cohort is not a timing of the recipe
        raise PflmError(f"{run_dir}: rounds {bad} did not aggregate all {cohort} devices; see metrics.jsonl")
    secs = [m["seconds"] for m in rounds]
    steady = secs[1:] or secs
    mean = statistics.fmean(steady)
    return {
        "round_seconds": secs,
        "steady_round_seconds": mean,
        "devices_per_second": cohort / mean,
        "wall_seconds": wall,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--out", required=True, help="scratch output dir (run dirs are replaced)")
    ap.add_argument("--backends", default="inprocess,flower")
    args = ap.parse_args(argv)
    out = Path(args.out)
    results = {}
    for backend in args.backends.split(","):
        cfg = load_recipe(args.recipe, [*args.overrides, f"backend={backend}", f"output_dir={out}", f"name=bench_{backend}"])
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        if backend == "flower":
            from pflm.flower.run import run_flower

            run_flower(cfg, progress=False)
        else:
            from pflm.simulation.simulator import Simulator

            Simulator(cfg).run(progress=False)
        results[backend] = _stats(cfg.run_dir, cfg.server.cohort_size, time.perf_counter() - t0)
        results[backend].update(
            {"cohort": cfg.server.cohort_size, "threads": cfg.threads, "num_supernodes": cfg.flower.num_supernodes,
             "cpus_per_client": cfg.flower.cpus_per_client}
        )
    atomic_write_json(out / "bench.json", results)
    for b, r in results.items():
        print(f"{b:10s} steady round {r['steady_round_seconds']:.2f} s  {r['devices_per_second']:.2f} devices/s  "
              f"rounds {[round(s, 2) for s in r['round_seconds']]}  wall {r['wall_seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
