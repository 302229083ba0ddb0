"""Distance to the limit (issue 21): the machine's measured matmul peak and a round's analytic FLOPs, for scripts/bench.py."""

from __future__ import annotations

import os
import time

import torch

from pflm.config import RecipeConfig
from pflm.model.flops import lstm_layer_flops, training_flops_per_token


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(threads: int, shapes: list[tuple[int, int, int]], repeats: int = 5,
                dev: torch.device = torch.device("cpu")) -> dict:
    """The machine's achievable float32 matrix-product rate on `threads` threads: best GFLOP/s over `repeats`
    runs of torch.mm for each (m, k, n) shape (a square one and the workload's own output-layer product)."""
    torch.set_num_threads(threads)
    out: dict = {}
    for m, k, n in shapes:
        a, b = torch.randn(m, k, device=dev), torch.randn(k, n, device=dev)
        torch.mm(a, b)  # warm-up (allocation, thread pool)
        _sync(dev)
        reps = max(1, int(2e10 // (2 * m * k * n)))  # ~20 GFLOP per timing
        best = 0.0
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            _sync(dev)
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
        out[f"{m}x{k}x{n}"] = best
    return {"gflops_by_shape": out, "peak_gflops": max(out.values()), "threads": threads, "load_avg": os.getloadavg()[0]}


def flops_report(cfg: RecipeConfig, vocab_size: int, target_tokens: int, seconds: dict[str, float], peak: dict) -> dict:
    """Analytic FLOPs of the round (valid target tokens x per-token training FLOPs, pflm.model.flops), the
    achieved GFLOP/s of each timed run and its share of the measured matmul peak."""
    per_token = training_flops_per_token(cfg.model, vocab_size)
    total = per_token * target_tokens
    rates = {k: total / v / 1e9 for k, v in seconds.items()}
    return {"flops_per_token": per_token,
            "flops_per_token_by_layer": {x.name: x.total for x in lstm_layer_flops(cfg.model, vocab_size)},
            "target_tokens": target_tokens, "round_flops": total, "gflops": rates, "peak": peak,
            "percent_of_peak": {k: 100.0 * r / peak["peak_gflops"] for k, r in rates.items()},
            "counted": "matrix products only (2 FLOPs per multiply-add); elementwise work, padding and the "
                       "optimizer are not counted"}
