"""Distributed DP vs central Gaussian at equal ε on the default recipe: perplexity, noise, payload per device.

Each variant runs the first --rounds rounds of recipes/chitchat_dp.yaml (calibrated for its full 200 rounds, so the
per-round noise is the default workload's) with secure aggregation in bit-exact simulate mode, then evaluates.
Variants share the seed-derived run key (privacy.reproducible=true), hence the same cohorts and device training
randomness: the differences come from the mechanism. Usage:
  python scripts/bench_ddp.py --data /tmp/ddp/chitchat --rounds 12 --variants central distributed_skellam:16 \\
      --json bench.json
With --lockstep all variants are built first and advanced one round at a time, in turn, evaluating each at the
--eval-at rounds and appending one JSON line per (variant, checkpoint) to --jsonl: a run stopped early (or killed at
a deadline) still leaves every variant compared at the same round count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

from pflm.config import load_recipe
from pflm.evaluation.perplexity import evaluate, load_eval_set
from pflm.simulation.simulator import Simulator


def run(variant: str, overrides: list[str], rounds: int, out: str) -> dict:
    name = f"bench_{variant}"
    shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    cfg = load_recipe("recipes/chitchat_dp.yaml", overrides + [f"name={name}", f"output_dir={out}"])
    t0 = time.time()
    drv = Simulator(cfg)
    agg, finalize = drv.aggregator, drv.aggregator.finalize

    def measured() -> object:  # std of (released sum − exact float sum) on the diagnostic probe coordinates
        res = finalize()
        probe = res.total.numpy()[:: agg._probe_stride(res.total.numel())].astype("float64")
        res.metrics["bench_sum_error_std"] = float((probe - agg._float_sum).std())
        return res

    agg.finalize = measured
    per_round = []
    for r in range(rounds):
        m = drv.run_round(r)
        per_round.append({k: m.get(k) for k in ("epsilon", "noise_std_sum", "bench_sum_error_std", "seconds",
                                                 "failed", "update_norm")})
    test = load_eval_set(drv.fd, "test", cfg.data.test_users)
    res = {"variant": variant, "val": evaluate(drv.server.model, drv.val_set)["perplexity"],
           "test_word": evaluate(drv.server.model, test)["word_perplexity"], "rounds": rounds,
           "seconds": time.time() - t0, "per_round": per_round, "summary_privacy": {}}
    p = drv.server.privacy
    res["noise_multiplier"] = p.noise_multiplier
    if p.distributed is not None:
        P = p.distributed.params
        res["summary_privacy"] = {"bits": P.bits, "gamma": P.gamma, "z": P.noise_multiplier,
                                  "rounding_inflation": P.rounding_inflation, "payload_bytes": P.payload_bytes(),
                                  "sum_std_deployment": P.sum_std(), "central_sigma_C": p.central_noise_multiplier * P.clip_bound,
                                  "sim_modulus_bits": p.distributed.scale.modulus_bits, "wrap_log2": P.wrap_log2()}
    drv.fanout.close()
    print(json.dumps(res), flush=True)
    return res


def _build(variant: str, overrides: list[str], out: str) -> tuple[Simulator, dict]:
    name = f"bench_{variant}"
    shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    cfg = load_recipe("recipes/chitchat_dp.yaml", overrides + [f"name={name}", f"output_dir={out}"])
    drv = Simulator(cfg)
    agg, finalize = drv.aggregator, drv.aggregator.finalize

    def measured() -> object:
        res = finalize()
        probe = res.total.numpy()[:: agg._probe_stride(res.total.numel())].astype("float64")
        res.metrics["bench_sum_error_std"] = float((probe - agg._float_sum).std())
        return res

    agg.finalize = measured
    return drv, {"cfg": cfg, "test": load_eval_set(drv.fd, "test", cfg.data.test_users), "seconds": 0.0, "rounds": []}


def lockstep(variants: list[tuple[str, list[str]]], rounds: int, eval_at: set[int], out: str, jsonl: str) -> None:
    runs = [(v, *_build(v, o, out)) for v, o in variants]
    for r in range(rounds):
        for v, drv, st in runs:
            t0 = time.time()
            m = drv.run_round(r)
            st["seconds"] += time.time() - t0
            st["rounds"].append({k: m.get(k) for k in ("epsilon", "bench_sum_error_std", "seconds", "failed")})
            if r + 1 in eval_at or r + 1 == rounds:
                errs = sorted(x["bench_sum_error_std"] for x in st["rounds"] if x["bench_sum_error_std"] is not None)
                rec = {"variant": v, "rounds": r + 1, "train_seconds": st["seconds"],
                       "val": evaluate(drv.server.model, drv.val_set)["perplexity"],
                       "test_word": evaluate(drv.server.model, st["test"])["word_perplexity"],
                       "epsilon": m.get("epsilon"), "median_sum_error_std": errs[len(errs) // 2] if errs else None,
                       "load": os.getloadavg()[0], "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                with open(jsonl, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                print(json.dumps(rec), flush=True)
    for _, drv, _ in runs:
        drv.fanout.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--variants", nargs="+", default=["central", "distributed_skellam:16"],
                    help="central or MECHANISM:BITS, e.g. distributed_skellam:16 distributed_dgauss:18")
    ap.add_argument("--out", default="/tmp/ddp/bench")
    ap.add_argument("--json", default="")
    ap.add_argument("--lockstep", action="store_true", help="advance all variants round by round (see above)")
    ap.add_argument("--eval-at", type=int, nargs="*", default=[25, 50, 100, 150, 200])
    ap.add_argument("--jsonl", default="bench_ddp.jsonl")
    a = ap.parse_args()
    base = [f"data.dir={a.data}", "aggregation.kind=secure", "aggregation.secagg.mode=simulate",
            "privacy.reproducible=true", "threads=2", "device_workers=2", "aggregation.secagg.measure_quant_error=true",
            "diagnostics=true"]
    if a.lockstep:
        vs = [(v, base) if v == "central" else
              ("_".join(v.split(":")), base + [f"privacy.mechanism={v.split(':')[0]}",
                                              f"privacy.distributed.bits={v.split(':')[1]}"]) for v in a.variants]
        lockstep(vs, a.rounds, set(a.eval_at), a.out, a.jsonl)
        return
    results = []
    for v in a.variants:
        if v == "central":
            results.append(run("central", base, a.rounds, a.out))
            continue
        mech, bits = v.split(":")
        results.append(run(f"{mech}_{bits}", base + [f"privacy.mechanism={mech}", f"privacy.distributed.bits={bits}"],
                           a.rounds, a.out))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
