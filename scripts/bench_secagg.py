"""Benchmark: secure-aggregation wall time vs the plain sum for a 1M-parameter update at cohort 10/100/400.

Prints one JSON document. Device-side costs (key generation, secret sharing, encoding, masking, answering the
unmasking request) are reported per device; server costs (routing, summing, reconstruction, mask removal,
decoding) separately. Everything runs in one process, so "round" wall time = Σ device time + server time.

    .venv/bin/python scripts/bench_secagg.py --cohorts 10,100,400 --graphs full,log
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from pflm.aggregator.base import Aggregator, RoundContext
from pflm.aggregator.plain import PlainSumAggregator
from pflm.aggregator.secagg import SecAggConfig, SecureAggregator

N_DISTINCT = 8  # distinct update vectors, reused cyclically (memory stays small at cohort 400)


def make_updates(dim: int, clip: float) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(N_DISTINCT):
        x = torch.randn(dim, generator=g)
        out.append((x * (clip / x.norm())).float())
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
    stages = ("advertise", "share", "encode", "mask", "unmask_clients")
    device_total = sum(m.get(f"secagg_seconds_{k}", 0.0) for k in stages)
    server_s = total - device_total
    return {
        "wall_s": round(total, 4),
        "vs_plain_x": round(total / plain_s, 1) if plain_s > 0 else None,
        "device_s_per_device": round(device_total / n, 5),
        "device_breakdown_s_per_device": {
            k: round(m.get(f"secagg_seconds_{k}", 0.0) / n, 5)
            for k in ("advertise", "share", "encode", "mask", "unmask_clients")
        },
        "server_s": round(server_s, 4),
        "server_unmask_s": round(m.get("secagg_seconds_unmask_server", 0.0), 4),
        "degree": int(m["secagg_degree"]),
        "threshold": int(m["secagg_threshold"]),
        "survivors": int(m["secagg_survivors"]),
        "bytes_up_per_device": int(m["secagg_bytes_per_device_mean"]),
        "quant_error_max": m.get("secagg_quant_error_max"),
        "quant_error_bound": m["secagg_quant_error_bound"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=1_000_000)
    ap.add_argument("--cohorts", default="10,100,400")
    ap.add_argument("--graphs", default="full,log")
    ap.add_argument("--modes", default="full,simulate")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout_masked_input probability")
    ap.add_argument("--max-full-graph-cohort", type=int, default=400, help="skip larger full-graph cohorts")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clip = 1.0
    ups = make_updates(args.dim, clip)
    report: dict = {
        "dim": args.dim,
        "dropout_masked_input": args.dropout,
        "machine": f"{platform.processor() or platform.machine()}, torch threads={args.threads}",
        "results": [],
    }
    for n in [int(c) for c in args.cohorts.split(",")]:
        ctx = RoundContext(round=0, dim=args.dim, cohort=list(range(n)), clip_bound=clip, seed=1)
        _, plain_s = run_round(PlainSumAggregator(), ctx, ups)
        row: dict = {"cohort": n, "plain_s": round(plain_s, 4), "plain_s_per_device": round(plain_s / n, 6)}
        for graph in args.graphs.split(","):
            if graph == "full" and n > args.max_full_graph_cohort:
                continue
            for mode in args.modes.split(","):
                cfg = SecAggConfig(mode=mode, neighbours=graph, dropout_masked_input=args.dropout)
                timing, total = run_round(SecureAggregator(cfg), ctx, ups)
                row[f"{mode}/{graph}"] = summarise(n, timing, total, plain_s)
                print(f"# cohort {n} {mode}/{graph}: {total:.2f} s (plain {plain_s:.3f} s)", flush=True)
                print("# " + json.dumps({"cohort": n, "case": f"{mode}/{graph}", **row[f"{mode}/{graph}"]}), flush=True)
        report["results"].append(row)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
