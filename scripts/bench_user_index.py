"""Benchmark: single-user loads from a 1M-synthetic-user store cost O(that user), in time and memory.

Builds stores of N users (default 10k and 1M; 1-5 sentences each, drawn from a pool of tokenised synthetic
voice-assistant sentences) with pflm's own `StoreWriter`, then, in a fresh child process per store, opens it
with `SplitStore` (the reader `FederatedData` uses) and times random single-user loads by index and by id,
reporting rows read and peak RSS. Equal per-user latency at 10k and 1M users and a flat RSS show the cost does
not grow with the population.

    .venv/bin/python scripts/bench_user_index.py [--users 10000 1000000] [--dir /tmp/pflm_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_mb(kind: str = "VmRSS") -> float:
    """Resident MB: VmRSS (all), RssAnon (heap: what the process really holds), RssFile (mapped file pages,
    reclaimable page cache shared with the OS - touched pages of the memory-mapped store land here)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(kind + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(path: Path, num_users: int, seed: int) -> dict:
    from data_prep import synthetic
    from pflm.data.normalize import Normalizer
    from pflm.data.store import StoreWriter
    from pflm.data.tokenizer import TokenizerConfig, train_tokenizer

    t0 = time.perf_counter()
    norm = Normalizer()
    pool_rows = synthetic.generate(2000, (5, 15), seed=seed)
    pool = sorted({norm(t) for t in pool_rows["text"]})
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(pool, TokenizerConfig(model_type="word", vocab_size=300), tmp)
        pool_ids = tok.encode(pool)
    rng = np.random.default_rng(seed)
    width = len(str(num_users - 1))
    counts = rng.integers(1, 6, size=num_users)
    picks = rng.integers(0, len(pool), size=int(counts.sum()))
    pos = 0
    with StoreWriter(path / "train", vocab_size=300) as w:
        for u in range(num_users):
            c = int(counts[u])
            sel = picks[pos:pos + c]
            pos += c
            w.add_user(f"user{u:0{width}d}", [pool[i] for i in sel], [pool_ids[i] for i in sel])
    stats = dict(w.stats)
    stats["build_s"] = round(time.perf_counter() - t0, 1)
    stats["bytes"] = sum(f.stat().st_size for f in (path / "train").iterdir())
    stats["build_peak_rss_mb"] = round(_peak_mb(), 1)
    return stats


def read(path: Path, samples: int, seed: int) -> dict:
    from pflm.data.store import SplitStore

    SplitStore(path / "train").user_tokens(0)  # warm up: lazy-loaded Arrow IPC code, first page faults
    base_rss, base_anon = _rss_mb(), _rss_mb("RssAnon")
    t0 = time.perf_counter()
    store = SplitStore(path / "train")
    open_s = time.perf_counter() - t0
    rss_open = _rss_mb()
    rng = np.random.default_rng(seed + 1)
    idx = rng.integers(0, store.num_users, size=samples)
    times = []
    for i in idx:
        t = time.perf_counter()
        store.user_tokens(int(i))
        times.append(time.perf_counter() - t)
    expected_rows = int(store.counts[idx].sum())
    assert store.rows_read == expected_rows, (store.rows_read, expected_rows)
    rss_after_index_reads = _rss_mb()
    anon_after, file_after = _rss_mb("RssAnon"), _rss_mb("RssFile")
    t = time.perf_counter()
    users = store.users()  # materialises every user id (needed only for lookups by id)
    users_list_s = time.perf_counter() - t
    by_id = []
    for i in idx[:200]:
        t = time.perf_counter()
        store.user_tokens(users[int(i)])
        by_id.append(time.perf_counter() - t)
    ms = np.array(times) * 1e3
    return {
        "users": store.num_users, "rows": store.num_rows, "open_s": round(open_s, 4),
        "load_ms_mean": round(float(ms.mean()), 4), "load_ms_p50": round(float(np.median(ms)), 4),
        "load_ms_p99": round(float(np.percentile(ms, 99)), 4),
        "load_by_id_ms_mean": round(float(np.mean(by_id) * 1e3), 4),
        "rows_read_random_loads": expected_rows, "rows_per_user_mean": round(expected_rows / samples, 2),
        "rss_before_open_mb": round(base_rss, 1), "rss_after_open_mb": round(rss_open, 1),
        "rss_after_random_loads_mb": round(rss_after_index_reads, 1), "anon_before_open_mb": round(base_anon, 1),
        "anon_after_random_loads_mb": round(anon_after, 1), "file_after_random_loads_mb": round(file_after, 1),
        "users_list_s": round(users_list_s, 3), "peak_rss_mb": round(_peak_mb(), 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, nargs="+", default=[10_000, 1_000_000])
    ap.add_argument("--dir", default="/tmp/pflm_bench")
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--read-only", help=argparse.SUPPRESS)  # child process: measure reads of one store
    args = ap.parse_args()
    if args.read_only:
        print(json.dumps(read(Path(args.read_only), args.samples, args.seed)))
        return 0
    for n in args.users:
        path = Path(args.dir) / f"users_{n}"
        if args.rebuild or not (path / "train" / "index.arrow").is_file():
            proc = subprocess.run([sys.executable, "-c", (
                "import json,sys; from pathlib import Path; sys.path.insert(0, %r); import bench_user_index as b; "
                "print(json.dumps(b.build(Path(%r), %d, %d)))") % (os.path.dirname(os.path.abspath(__file__)),
                                                                 str(path), n, args.seed)],
                capture_output=True, text=True, check=True)
            print(f"built {n} users: {proc.stdout.strip()}", flush=True)
        proc = subprocess.run([sys.executable, __file__, "--read-only", str(path), "--samples", str(args.samples),
                               "--seed", str(args.seed)], capture_output=True, text=True, check=True)
        r = json.loads(proc.stdout)
        print(f"read {n} users: {json.dumps(r)}", flush=True)
        print(f"  -> {r['load_ms_mean']:.3f} ms/user (p99 {r['load_ms_p99']:.3f}) by index, "
              f"{r['load_by_id_ms_mean']:.3f} ms by id; open {r['open_s'] * 1e3:.1f} ms; "
              f"RSS {r['rss_before_open_mb']:.0f} -> {r['rss_after_open_mb']:.0f} (open) -> "
              f"{r['rss_after_random_loads_mb']:.0f} MB after {args.samples} random users "
              f"(heap {r['anon_before_open_mb']:.0f} -> {r['anon_after_random_loads_mb']:.0f} MB, mapped file pages "
              f"{r['file_after_random_loads_mb']:.0f} MB); peak {r['peak_rss_mb']:.0f} MB (incl. all {n} ids as Python strings)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
