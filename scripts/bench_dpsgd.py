"""Benchmark on-device DP-SGD: local step time and peak memory, DP-SGD (ghost, hooks) vs plain SGD, large vocab.

Each configuration runs in a fresh subprocess (peak RSS = that process's VmHWM), with glibc malloc told to keep
big per-sample tensors mapped (MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_, see /work/shared/NOTES.md).
The device trains synthetic Zipf-distributed sentences through the real `DeviceTrainer` (same code path as the
simulator). Configurations: PEU top-k rows + LoRA (the recipe's setting) and the full vocabulary; non-DP, Opacus'
ghost clipping on the padded head ("ghost_*") and the packed head with its book-kept clipped sum ("fast_*",
pflm.device.dp_fast) side by side.

    python scripts/bench_dpsgd.py --vocab 50000 --k 2000 --devices 6
prints one JSON object: per configuration the median step time (s), per-device setup (s), steps and peak RSS (MB).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "68719476736"}

# name -> (dpsgd mode or None, PEU on, LSTM: "fused" (pflm.model.fused_dplstm) or Opacus' "opacus" DPLSTM).
# "ghost_*": Opacus' two-pass ghost clipping on the padded head (dpsgd.fast_ghost=false); "fast_*": the packed
# head with its book-kept clipped sum (pflm.device.dp_fast, dpsgd.fast_ghost=true).
CONFIGS = {
    "nodp_peu_lora": (None, True, "fused"),
    "fast_peu_lora": ("fast", True, "fused"),
    "ghost_peu_lora": ("ghost", True, "fused"),
    "ghost_opacus_peu_lora": ("ghost", True, "opacus"),
    "hooks_peu_lora": ("hooks", True, "fused"),
    "hooks_opacus_peu_lora": ("hooks", True, "opacus"),
    "nodp_full_lora": (None, False, "fused"),
    "fast_full_lora": ("fast", False, "fused"),
    "ghost_full_lora": ("ghost", False, "fused"),
    "ghost_opacus_full_lora": ("ghost", False, "opacus"),
    "hooks_full_lora": ("hooks", False, "fused"),
}


def parse_config(name: str, default_sigma: float) -> tuple[str, float, str]:
    """"ghost_full_lora@1" -> (config, sigma 1, noise "f32"); "...@1f64": the float64 noise path used before
    issue 21 (SecureRandom.normal, then cast), for before/after in one run; no "@": --sigma."""
    base, _, tail = name.partition("@")
    if base not in CONFIGS:
        raise SystemExit(f"unknown config {base!r}; choose from {', '.join(CONFIGS)} (optionally @SIGMA or @SIGMAf64)")
    noise = "f64" if tail.endswith("f64") else "f32"
    return base, float(tail[:-3] if noise == "f64" else tail) if tail else default_sigma, noise


def _peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def run_child(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from pflm.config import load_recipe
    from pflm.device.spec import DeviceSpec
    from pflm.device.trainer import DeviceTrainer
    from pflm.secure_random import new_key

    base, sigma, noise = parse_config(args.child, args.sigma)
    mode, peu, lstm = CONFIGS[base]
    if noise == "f64":  # the pre-issue-21 device noise: float64 Box–Muller from the float64 ChaCha20 stream
        from pflm.secure_random import SecureRandom

        SecureRandom.normal_f32 = lambda self, i, shape, std, purpose="update": self.normal(  # type: ignore
            i, shape, std, purpose, dtype=torch.float64)
    emb, hid = (int(v) for v in args.dims.split("/"))
    over = [
        f"model.embedding_dim={emb}", f"model.hidden_dim={hid}", f"model.lora.rank={args.lora_rank}",
        f"dpsgd.fused_lstm={'true' if lstm == 'fused' else 'false'}",
        "model.tie_embeddings=false", f"device.batch_size={args.batch}", "device.lr=0.1",
        f"device.loss={args.loss}", f"dpsgd.enabled={'true' if mode else 'false'}",
        f"dpsgd.grad_sample_mode={'ghost' if mode == 'fast' else mode or 'hooks'}",
        f"dpsgd.fast_ghost={'true' if mode == 'fast' else 'false'}", f"dpsgd.noise_multiplier={sigma}",
        "dpsgd.max_grad_norm=1.0",
        f"peu.mode={'topk' if peu else 'all'}", f"peu.k={args.k}", f"data.max_tokens={args.seq}",
    ]
    cfg = load_recipe(None, over)
    rng = np.random.default_rng(0)
    counts = (1.0 / np.arange(1, args.vocab + 1) ** 1.1) * 1e7  # Zipf prior; ids 0-3 are specials
    counts[:4] = 0
    t0 = time.perf_counter()
    trainer = DeviceTrainer(DeviceSpec.from_recipe(cfg, args.vocab), counts)
    build_s = time.perf_counter() - t0
    rows = torch.arange(args.k) if peu else None  # the k most frequent ids (specials included)
    trainer.load_round(0, trainer.model.state_dict(), rows)
    p = counts[4:] / counts[4:].sum()

    def device_sentences() -> list[list[int]]:
        lens = rng.integers(8, args.seq + 1, size=args.sentences)
        return [list(rng.choice(len(p), size=int(n), p=p) + 4) for n in lens]

    step_times, setups, steps = [], [], []
    for d in range(args.devices + 1):
        sents = device_sentences()
        t = time.perf_counter()
        res = trainer.train(d, sents, new_key())
        dt = time.perf_counter() - t
        if d == 0:
            continue  # warm-up device
        n_steps = int(res.metrics["local_steps"])
        if n_steps:
            step_times.append(dt / n_steps)
        steps.append(n_steps)
        setups.append(float(res.metrics.get("device_dp_setup_seconds", 0.0)))
    trainable = sum(p.numel() for p in trainer.trainable)
    return {
        "config": args.child, "mode": mode or "none", "lstm": lstm if mode else "nn.LSTM", "peu_k": args.k if peu else args.vocab, "vocab": args.vocab,
        "median_step_s": statistics.median(step_times), "min_step_s": min(step_times),
        "max_step_s": max(step_times), "mean_steps_per_device": statistics.mean(steps),
        "median_device_setup_s": statistics.median(setups), "trainer_build_s": build_s,
        "wrap_s": getattr(trainer.dpsgd, "wrap_seconds", 0.0), "trainable_params": trainable,
        "peak_rss_mb": _peak_rss_mb(), "threads": args.threads,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=50_000)
    ap.add_argument("--k", type=int, default=2000, help="PEU rows per round")
    ap.add_argument("--lora-rank", type=int, default=8, help="0 = no LoRA (every weight trained)")
    ap.add_argument("--dims", default="256/512", help="embedding/hidden size")
    ap.add_argument("--sigma", type=float, default=1.0, help="device noise multiplier (0: no CSPRNG noise draws, "
                    "i.e. the cost of per-sample clipping alone)")
    ap.add_argument("--passes", type=int, default=1, help="run the config list this many times, interleaved; "
                    "medians over passes")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--sentences", type=int, default=64, help="sentences per device (q = batch / sentences)")
    ap.add_argument("--seq", type=int, default=20, help="max sentence length")
    ap.add_argument("--loss", default="full", choices=["full", "sampled_softmax", "nce"])
    ap.add_argument("--devices", type=int, default=4, help="timed devices per config (after one warm-up)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per config subprocess")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(args)))
        return 0
    env = {**os.environ, **MALLOC_ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    base = [a for a in (argv if argv is not None else sys.argv[1:])]
    names = args.configs.split(",")
    for name in names:
        parse_config(name, args.sigma)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    load_start = os.getloadavg()
    for _ in range(args.passes):  # config A, B, C, A, B, C, ...: load drift hits every config alike
        for name in names:
            cmd = [sys.executable, "-W", "ignore", os.path.abspath(__file__), *base, "--child", name]
            try:
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
            except subprocess.TimeoutExpired:
                runs[name].append({"error": f"timeout after {args.timeout:.0f}s"})
                continue
            if out.returncode != 0:
                tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["?"]
                runs[name].append({"error": f"exit {out.returncode}: {tail[0][:300]}"})
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            runs[name].append(r)
            print(f"[bench_dpsgd] {name}: {r['median_step_s']:.4f} s/step, {r['peak_rss_mb']:.0f} MB",
                  file=sys.stderr, flush=True)
    results = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            results[name] = rs[-1]
            continue
        results[name] = {**ok[-1], "median_step_s": statistics.median(r["median_step_s"] for r in ok),
                         "passes_step_s": [r["median_step_s"] for r in ok],
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in ok)}
    ratios = {}
    for name, r in results.items():  # DP step / non-DP step of the same vocabulary setting
        want = "nodp_" + name.partition("@")[0].split("_", 1)[1].replace("opacus_", "")
        base_name = next((n for n in results if n.partition("@")[0] == want), want)
        if r.get("mode") not in (None, "none") and "median_step_s" in r and "median_step_s" in results.get(base_name, {}):
            ratios[f"{name}/{base_name}"] = r["median_step_s"] / results[base_name]["median_step_s"]
    load = os.getloadavg()
    print(json.dumps({"results": results, "dp_over_nodp_step": ratios, "loadavg_start": load_start,
                      "loadavg_end": load, "command": " ".join(["scripts/bench_dpsgd.py", *base]),
                      "malloc_env": MALLOC_ENV}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
