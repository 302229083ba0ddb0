"""Benchmark: secure-aggregation wall time vs the plain sum, and its share of a real training round.

Prints one JSON document with two parts:

* `vector` — a 1M-parameter update (`--dim`) summed by cohorts of 10 / 100 / 400 devices: plain sum vs the full
  protocol (complete graph and SecAgg+ log-degree graph) and the bit-exact `simulate` mode. Device-side costs
  (key generation, secret sharing, encoding + masking, answering the unmasking request) are reported per device,
  server costs (summing, reconstruction, mask removal, decoding) separately; everything runs in this process.
* `recipe` — the share of a round of a recipe (default: the default recipe at cohort 100) that secure
  aggregation costs: the same rounds with aggregation=plain, secure (full protocol, log graph) and secure
  (simulate), interleaved after a warm-up round; share = (secure − plain) / secure of the median round times.

    .venv/bin/python scripts/bench_secagg.py --cohorts 10,100,400 --recipe recipes/chitchat_dp.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

from pflm.aggregator.base import Aggregator, RoundContext
from pflm.aggregator.plain import PlainSumAggregator
from pflm.aggregator.secagg import SecAggConfig, SecureAggregator

N_DISTINCT = 8  # distinct update vectors, reused cyclically (memory stays small at cohort 400)
DEVICE_STAGES = ("advertise", "share", "encode", "masked_input", "unmask_clients")


def make_updates(dim: int, clip: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(N_DISTINCT):
        x = torch.randn(dim, generator=g, dtype=torch.float64)
        out.append((x * (clip * (1 - 1e-7) / x.norm())).float())  # clipped as L2Clip does: float64 norm ≤ C
    return out


def run_round(agg: Aggregator, ctx: RoundContext, ups: list[torch.Tensor]) -> tuple[dict, float]:
    t0 = time.perf_counter()
    agg.begin(ctx)
    t1 = time.perf_counter()
    for i, u in enumerate(ctx.cohort):
        agg.add(u, ups[i % N_DISTINCT], 1.0, {"clipped": 0.0})
    t2 = time.perf_counter()
    res = agg.finalize()
    t3 = time.perf_counter()
    return {"begin_s": t1 - t0, "add_s": t2 - t1, "finalize_s": t3 - t2, "metrics": res.metrics}, t3 - t0


def summarise(n: int, timing: dict, total: float, plain_s: float) -> dict:
    m = timing["metrics"]
    device_total = sum(m.get(f"secagg_seconds_{k}", 0.0) for k in DEVICE_STAGES)
    return {
        "wall_s": round(total, 4),
        "vs_plain_x": round(total / plain_s, 1) if plain_s > 0 else None,
        "device_s_per_device": round(device_total / n, 5),
        "device_breakdown_s_per_device": {k: round(m.get(f"secagg_seconds_{k}", 0.0) / n, 5) for k in DEVICE_STAGES},
        "server_s": round(total - device_total, 4),
        "server_unmask_s": round(m.get("secagg_seconds_unmask_server", 0.0), 4),
        "degree": int(m["secagg_degree"]),
        "threshold": int(m["secagg_threshold"]),
        "survivors": int(m["secagg_survivors"]),
        "bytes_up_per_device": int(m["secagg_bytes_per_device_mean"]),
        "quant_error_max": m.get("secagg_quant_error_max"),
        "quant_error_bound": m["secagg_quant_error_bound"],
    }


def vector_bench(args: argparse.Namespace) -> list[dict]:
    clip = 1.0
    ups = make_updates(args.dim, clip)
    rows = []
    for n in [int(c) for c in args.cohorts.split(",") if c]:
        ctx = RoundContext(round=0, dim=args.dim, cohort=list(range(n)), clip_bound=clip, seed=1)
        _, plain_s = run_round(PlainSumAggregator(), ctx, ups)
        row: dict = {"cohort": n, "plain_s": round(plain_s, 4), "plain_s_per_device": round(plain_s / n, 6)}
        for graph in args.graphs.split(","):
            if graph == "full" and n > args.max_full_graph_cohort:
                continue
            for mode in args.modes.split(","):
                cfg = SecAggConfig(mode=mode, neighbours=graph, dropout_masked_input=args.dropout, threads=args.secagg_threads,
                                   measure_quant_error=True)  # benchmark diagnostic (plaintext probes; off by default)
                timing, total = run_round(SecureAggregator(cfg), ctx, ups)
                row[f"{mode}/{graph}"] = summarise(n, timing, total, plain_s)
                print(f"# cohort {n} {mode}/{graph}: {total:.2f} s (plain {plain_s:.3f} s)", file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def recipe_bench(args: argparse.Namespace) -> dict:
    from pflm.config import load_recipe
    from pflm.simulation.simulator import Simulator

    cases = {
        "plain": ["aggregation=plain"],
        "secure_full_log": ["aggregation=secure", "aggregation.secagg.neighbours=log"],
        "secure_simulate_log": ["aggregation=secure", "aggregation.secagg.neighbours=log", "aggregation.secagg.mode=simulate"],
    }
    out_dir = tempfile.mkdtemp(prefix="pflm-bench-secagg-")
    sims = {}
    for name, ovs in cases.items():
        base = [f"cohort={args.recipe_cohort}", f"output_dir={out_dir}", f"name={name}", *args.override]
        sims[name] = Simulator(load_recipe(args.recipe, base + ovs))
    times: dict[str, list[float]] = {k: [] for k in cases}
    stages: dict[str, list[dict]] = {k: [] for k in cases}
    for r in range(args.recipe_rounds + 1):  # round 0 warms up every case
        for name, sim in sims.items():
            m = sim.run_round(r)
            if "failed" in m:
                raise RuntimeError(f"{name} round {r} failed: {m['failed']}")
            if r > 0:
                times[name].append(m["seconds"])
                stages[name].append({k[len("secagg_seconds_"):]: v for k, v in m.items() if k.startswith("secagg_seconds_")})
    med = {k: statistics.median(v) for k, v in times.items()}
    cfg = sims["plain"].cfg
    res: dict = {
        "recipe": args.recipe,
        "overrides": args.override,
        "cohort": args.recipe_cohort,
        "release_dim": sims["plain"].server.release_dim(),
        "threads": cfg.threads,
        "device_workers": cfg.device_workers,
        "round_seconds_median": med,
        "round_seconds_runs": times,
    }
    for name in ("secure_full_log", "secure_simulate_log"):
        res[f"{name}_share_of_round"] = (med[name] - med["plain"]) / med[name]
        per = stages[name]
        res[f"{name}_stage_seconds_median"] = {k: statistics.median(s[k] for s in per) for k in per[0]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1_000_000)
    ap.add_argument("--cohorts", default="10,100,400", help="vector part; '' skips it")
    ap.add_argument("--graphs", default="full,log")
    ap.add_argument("--modes", default="full,simulate")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout_masked_input probability")
    ap.add_argument("--max-full-graph-cohort", type=int, default=400, help="skip larger full-graph cohorts")
    ap.add_argument("--secagg-threads", type=int, default=0, help="aggregation.secagg.threads (0 = all CPUs)")
    ap.add_argument("--recipe", default="", help="also time real rounds of this recipe (e.g. recipes/chitchat_dp.yaml)")
    ap.add_argument("--recipe-cohort", type=int, default=100)
    ap.add_argument("--recipe-rounds", type=int, default=3, help="timed rounds per case after one warm-up round")
    ap.add_argument("override", nargs="*", help="recipe overrides a.b=value")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    report: dict = {
        "command": " ".join(["scripts/bench_secagg.py", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_avg_start": list(os.getloadavg()),
        "dim": args.dim,
        "dropout_masked_input": args.dropout,
        "secagg_threads": args.secagg_threads,
    }
    if args.cohorts:
        report["vector"] = vector_bench(args)
    if args.recipe:
        report["recipe"] = recipe_bench(args)
    report["load_avg_end"] = list(os.getloadavg())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
