"""Where a default-recipe device's time goes (issue 21): matrix products vs everything else, per simulated device.

    python scripts/profile_device.py --data DIR [--devices 40] [--threads 1]

Trains the cohort of round 0 (the default recipe chitchat_dp without noise = chitchat_fl with <= 32 sentences and clip 0.3: LSTM 128/256, 10k words, <= 32 sentences = 2 local steps per device,
clipping) through the real simulator's DeviceTrainer under torch.profiler and prints one JSON object: seconds per
device, the share of aten matrix products (mm/addmm/bmm: the work that batching devices into one kernel could
speed up) and of the rest (optimizer, copies, zeroing, delta, clipping, the LSTM's elementwise work), and the
device's analytic matrix-product FLOPs (pflm.model.flops). Amdahl: if batching made every matrix product free,
devices/s could grow at most 1 / (1 - matmul share).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from pflm.config import load_recipe
from pflm.device.batching import device_setup
from pflm.model.flops import training_flops_per_token
from pflm.secure_random import subkey
from pflm.simulation.simulator import Simulator

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_rnn_layer",
          "aten::mkldnn_rnn_layer_backward")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--devices", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_recipe("recipes/chitchat_fl.yaml", ["data.max_sentences_per_device=32", "privacy.clip_bound=0.3", f"data.dir={args.data}", f"server.cohort_size={args.devices}",
                      "server.sampling=fixed", "device_workers=1", f"threads={args.threads}", "output_dir=/tmp",
                      "server.optimizer=fedavg"])
    sim = Simulator(cfg)
    plan = sim.server.plan_round(0)
    tr = sim.fanout.trainer
    tr.load_round(0, plan.device_state, plan.rows)
    users = plan.cohort
    data = {u: sim.fd.user_tokens("train", u) for u in users}
    keys = {u: subkey(sim.run_key, "device", 0, u) for u in users}
    clip = cfg.privacy.clip_bound
    tr.train(users[0], data[users[0]], keys[users[0]])  # warm-up
    tokens = 0
    for u in users:
        _, _, seqs, lengths = device_setup(data[u], keys[u], cfg.data.max_sentences_per_device, cfg.data.max_tokens)
        tokens += int((lengths - 1).sum())
    la = os.getloadavg()[0]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for u in users:
            res = tr.train(u, data[u], keys[u])
            norm = res.update.norm()
            res.update.mul_(min(1.0, clip / (float(norm) + 1e-12)))
        wall = time.perf_counter() - t0
    ev = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in ev) / 1e6
    mm = sum(e.self_cpu_time_total for e in ev if e.key in MATMUL) / 1e6
    top = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:12]
    flops = training_flops_per_token(cfg.model, sim.vocab_size) * tokens
    print(json.dumps({
        "devices": len(users), "threads": args.threads, "wall_seconds": wall, "seconds_per_device": wall / len(users),
        "profiled_cpu_seconds": total, "matmul_seconds": mm, "matmul_share": mm / total,
        "amdahl_max_speedup_if_matmuls_were_free": total / max(total - mm, 1e-9),
        "target_tokens": tokens, "analytic_gflop": flops / 1e9, "achieved_gflops": flops / wall / 1e9,
        "top_ops_seconds": {e.key: round(e.self_cpu_time_total / 1e6, 4) for e in top},
        "load_avg": [la, os.getloadavg()[0]],
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
