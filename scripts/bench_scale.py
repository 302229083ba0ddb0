"""Rounds at scale (issue 21): round time and peak RSS at cohorts 100 / 300 / 1,000 of a 1M-user prepared store.

    python scripts/synth_corpus.py --users 1000000 --out /tmp/synth1m.parquet
    pflm prepare --stream --input /tmp/synth1m.parquet --user-column user --tokenizer-input wordfreq \
        --max-sentences 32 --out /tmp/data1m
    python scripts/bench_scale.py --data /tmp/data1m --cohorts 100,300,1000 --threads 1

Each cohort runs in a FRESH process (so its VmHWM is that run's peak resident memory): the default recipe's
model and devices (scripts/bench.py preset default_recipe: LSTM 128/256, 10k words, at most 32 sentences per
device, clipping 0.3, FedAvg), one warm-up round (round 0) then the timed round 1, one device at a time. Prints
one JSON document: per cohort the setup time (open the store, build the server), round time, devices/s,
sentences, and VmHWM; plus seconds per device and per sentence, whose spread across cohorts is the linearity check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _status(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def child(data: str, cohort: int, threads: int, workers: int) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import BASE, PRESETS, make_recipe

    from pflm.simulation.simulator import Simulator

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix="pflm_scale_")
    cfg = make_recipe(data, tmp, threads, PRESETS["default_recipe"]["model"],
                      {"server.cohort_size": cohort, "device_workers": workers, "data.val_users": 10})
    sim = Simulator(cfg)
    setup = time.perf_counter() - t0
    rss_setup = _status("VmRSS")
    t1 = time.perf_counter()
    sim.run_round(0)
    warm = time.perf_counter() - t1
    plan = sim.server.plan_round(1)
    counts = sim.fd.split("train").counts
    cap = cfg.data.max_sentences_per_device
    sentences = int(sum(min(int(counts[u]), cap) for u in plan.cohort))
    t2 = time.perf_counter()
    m = sim.run_round(1)
    secs = time.perf_counter() - t2
    if "failed" in m:
        raise RuntimeError(f"round failed: {m['failed']}")
    return {"cohort": cohort, "train_users": sim.fd.num_users("train"), "setup_seconds": setup,
            "round0_seconds": warm, "round_seconds": secs, "devices_per_second": cohort / secs,
            "sentences": sentences, "seconds_per_device": secs / cohort, "ms_per_sentence": 1e3 * secs / sentences,
            "rss_after_setup_mb": rss_setup, "peak_rss_mb": _status("VmHWM"), "load_avg": os.getloadavg()[0],
            "recipe": {**BASE, **PRESETS["default_recipe"]["model"], "server.cohort_size": cohort}}


def interleaved(data: str, cohorts: list[int], threads: int, rounds: int) -> dict:
    """Linearity under load: every cohort's simulator in ONE process, rounds timed in turn (c1, c2, c3, c1, ...)
    after a warm-up round each, so load drift hits all cohorts alike; per cohort the medians of seconds per
    device and per sentence (peak RSS is the fresh-process mode's job)."""
    import statistics

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import PRESETS, make_recipe

    from pflm.simulation.simulator import Simulator

    torch.set_num_threads(threads)
    tmp = tempfile.mkdtemp(prefix="pflm_scale_")
    sims = {c: Simulator(make_recipe(data, tmp, threads, PRESETS["default_recipe"]["model"],
                                     {"server.cohort_size": c, "device_workers": 1, "data.val_users": 10}))
            for c in cohorts}
    for sim in sims.values():
        sim.run_round(0)
    runs: dict[int, list[dict]] = {c: [] for c in cohorts}
    for r in range(1, rounds + 1):
        for c, sim in sims.items():
            counts = sim.fd.split("train").counts
            cap = sim.cfg.data.max_sentences_per_device
            sentences = int(sum(min(int(counts[u]), cap) for u in sim.server.plan_round(r).cohort))
            la = os.getloadavg()[0]
            t0 = time.perf_counter()
            sim.run_round(r)
            secs = time.perf_counter() - t0
            runs[c].append({"round": r, "seconds": secs, "sentences": sentences, "load_avg": la})
    out = {}
    for c, rs in runs.items():
        out[str(c)] = {"runs": rs, "seconds_per_device": statistics.median(x["seconds"] / c for x in rs),
                       "ms_per_sentence": statistics.median(1e3 * x["seconds"] / x["sentences"] for x in rs)}
    per = [v["ms_per_sentence"] for v in out.values()]
    return {"cohorts": out, "ms_per_sentence_spread": max(per) / min(per)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a prepared store (e.g. 1M synthetic users, prepared --stream)")
    ap.add_argument("--cohorts", default="100,300,1000")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device-workers", type=int, default=1)
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--interleave", type=int, default=0, help="instead: N timed rounds per cohort, interleaved in "
                    "one process (the linearity check under load)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.interleave:
        doc = {"command": " ".join(["scripts/bench_scale.py", *sys.argv[1:]]), "load_avg_start": list(os.getloadavg()),
               **interleaved(args.data, [int(x) for x in args.cohorts.split(",")], args.threads, args.interleave),
               "load_avg_end": list(os.getloadavg())}
        text = json.dumps(doc, indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n", encoding="utf-8")
        return 0
    if args.child:
        print(json.dumps(child(args.data, args.child, args.threads, args.device_workers)))
        return 0
    doc: dict = {"command": " ".join(["scripts/bench_scale.py", *sys.argv[1:]]), "data": args.data,
                 "threads": args.threads, "load_avg_start": list(os.getloadavg()), "cohorts": {}}
    for c in [int(x) for x in args.cohorts.split(",")]:
        cmd = [sys.executable, __file__, "--data", args.data, "--threads", str(args.threads),
               "--device-workers", str(args.device_workers), "--child", str(c)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            doc["cohorts"][str(c)] = {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "?"}
            continue
        res = json.loads(out.stdout.strip().splitlines()[-1])
        doc["cohorts"][str(c)] = res
        print(f"[bench_scale] cohort {c}: {res['round_seconds']:.1f} s, peak RSS {res['peak_rss_mb']:.0f} MB",
              file=sys.stderr, flush=True)
    ok = [v for v in doc["cohorts"].values() if "round_seconds" in v]
    if len(ok) > 1:
        per = [v["ms_per_sentence"] for v in ok]
        doc["ms_per_sentence_spread"] = max(per) / min(per)
    doc["load_avg_end"] = list(os.getloadavg())
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
