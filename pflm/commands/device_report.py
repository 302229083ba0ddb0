"""`pflm device-report RECIPE`: what one device pays per round — parameters, payload, peak memory, step time.

Each variant (full model, PEU, LoRA, NCE, all three) is measured in a fresh Python process: peak resident
memory is read from the kernel (VmHWM, reset after imports), so it is what the device really touches,
not a formula. The device trains on synthetic Zipf-distributed token batches of the recipe's shape, so the
report needs no data directory when `--vocab-size` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from pflm.config import RecipeConfig, load_recipe, recipe_to_dict
from pflm.schema import apply_overrides, from_dict
from pflm.errors import PflmError
from pflm.tokens import NUM_SPECIAL

VARIANTS = ("full", "peu", "lora", "nce", "peu+lora+nce")


def variant_overrides(cfg: RecipeConfig, variant: str, vocab: int) -> list[str]:
    peu_k = cfg.peu.k if cfg.peu.mode != "all" else min(5000, max(8, vocab // 10))
    peu_mode = cfg.peu.mode if cfg.peu.mode != "all" else "topk"
    rank = cfg.model.lora.rank or 8
    loss = cfg.device.loss if cfg.device.loss != "full" else "sampled_softmax"
    ov = {"peu.mode": "all", "model.lora.rank": 0, "device.loss": "full"}
    if "peu" in variant:
        ov.update({"peu.mode": peu_mode, "peu.k": peu_k})
    if "lora" in variant:
        ov["model.lora.rank"] = rank
    if "nce" in variant:
        ov["device.loss"] = loss
    return [f"{k}={v}" for k, v in ov.items()]


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _warm_up_torch() -> None:
    """Touch torch's lazily-allocated runtime (thread pools, kernels) so the baseline excludes it."""
    import torch

    m = torch.nn.LSTM(8, 8, batch_first=True)
    emb = torch.nn.Embedding(16, 8)
    x = torch.randint(0, 16, (2, 5))
    out, _ = m(emb(x))
    torch.nn.functional.cross_entropy(out.reshape(-1, 8), torch.zeros(10, dtype=torch.long)).backward()
    torch.optim.SGD(list(m.parameters()) + list(emb.parameters()), lr=0.1).step()


def measure_child(cfg_dict: dict, vocab: int, sentences: int) -> dict:
    """Runs inside the fresh process."""
    import numpy as np
    import torch

    from pflm.device.spec import DeviceSpec
    from pflm.device.trainer import DeviceTrainer
    from pflm.server.peu import RowSelector

    torch.set_num_threads(int(os.environ.get("PFLM_REPORT_THREADS", "1")))
    cfg = from_dict(RecipeConfig, cfg_dict)
    rng = np.random.default_rng(0)
    counts = (1.0 / np.arange(1, vocab + 1)) * 1e6  # Zipf prior (stands in for token_counts.npy)
    lengths = rng.integers(3, cfg.data.max_tokens + 1, size=sentences)
    sents = [(rng.zipf(1.2, size=n) % (vocab - NUM_SPECIAL) + NUM_SPECIAL).tolist() for n in lengths]
    _warm_up_torch()
    base_rss = _vm_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    trainer = DeviceTrainer(DeviceSpec.from_recipe(cfg, vocab), counts)
    rows = RowSelector(cfg.peu, vocab, counts, cfg.seed).select(0)
    state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    trainer.load_round(0, state, rows)
    down = sum(t.numel() * t.element_size() for t in state.values())
    from pflm.secure_random import new_key

    trainer.train(0, sents, new_key())  # warm-up
    res = trainer.train(1, sents, new_key())
    peak = _vm_kb("VmHWM")
    steps = max(res.metrics.get("local_steps", 1), 1)
    return {
        "trainable_params": trainer.layout.dim,
        "device_model_params": sum(p.numel() for p in trainer.model.parameters()),
        "payload_down_bytes": down,
        "payload_up_bytes": trainer.layout.dim * 4,
        "peak_train_memory_mb": (peak - base_rss) / 1024,
        "process_peak_rss_mb": peak / 1024,
        "step_seconds": res.seconds / steps,
        "local_steps": steps,
    }


def run_report(cfg: RecipeConfig, vocab: int, sentences: int = 64) -> dict:
    out = {}
    for v in VARIANTS:
        data = apply_overrides(recipe_to_dict(cfg), variant_overrides(cfg, v, vocab))
        data["dpsgd"]["enabled"] = cfg.dpsgd.enabled
        vcfg = from_dict(RecipeConfig, data)
        payload = json.dumps({"cfg": recipe_to_dict(vcfg), "vocab": vocab, "sentences": sentences})
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4294967296", MALLOC_TRIM_THRESHOLD_="68719476736")
        proc = subprocess.run(
            [sys.executable, "-c", "import sys,json; from pflm.commands.device_report import _child; _child()"],
            input=payload, capture_output=True, text=True, env=env,
        )
        if proc.returncode != 0:
            raise PflmError(f"device-report variant {v} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
        out[v] = json.loads(proc.stdout.strip().splitlines()[-1])
    full = out["full"]
    for v, r in out.items():
        r["memory_reduction_vs_full"] = full["peak_train_memory_mb"] / max(r["peak_train_memory_mb"], 1e-9)
        r["upload_reduction_vs_full"] = full["payload_up_bytes"] / r["payload_up_bytes"]
    return {"vocab_size": vocab, "model": recipe_to_dict(cfg.model), "batch_size": cfg.device.batch_size,
            "max_tokens": cfg.data.max_tokens, "sentences_per_device": sentences, "variants": out}


def _child() -> None:
    req = json.loads(sys.stdin.read())
    print(json.dumps(measure_child(req["cfg"], req["vocab"], req["sentences"])))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("device-report", help="per-device parameters, payload, peak memory and step time")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--vocab-size", type=int, default=0, help="vocabulary size (default: the recipe's data dir)")
    p.add_argument("--sentences", type=int, default=64, help="sentences on the simulated device")
    p.add_argument("--out", help="also write the JSON report to this file")
    p.set_defaults(func=report_cmd)


def report_cmd(args: argparse.Namespace) -> int:
    from pflm.io_utils import atomic_write_json

    cfg = load_recipe(args.recipe, args.overrides)
    vocab = args.vocab_size
    if not vocab:
        if not cfg.data.dir:
            raise PflmError("give --vocab-size N or a recipe with data.dir")
        from pflm.data.store import FederatedData

        vocab = FederatedData.open(cfg.data.dir).vocab_size
    if vocab < 16:
        raise PflmError(f"--vocab-size {vocab} is too small; use at least 16")
    rep = run_report(cfg, vocab, args.sentences)
    if args.out:
        atomic_write_json(Path(args.out), rep)
    hdr = f"{'variant':<14}{'trainable':>12}{'down MB':>10}{'up MB':>9}{'peak MB':>9}{'step ms':>9}{'mem x':>7}{'up x':>7}"
    print(hdr)
    for v, r in rep["variants"].items():
        print(f"{v:<14}{r['trainable_params']:>12,}{r['payload_down_bytes'] / 2**20:>10.1f}{r['payload_up_bytes'] / 2**20:>9.2f}"
              f"{r['peak_train_memory_mb']:>9.1f}{r['step_seconds'] * 1e3:>9.1f}{r['memory_reduction_vs_full']:>7.1f}"
              f"{r['upload_reduction_vs_full']:>7.1f}")
    return 0
