"""Simulation speed benchmark (issue 10): plain-torch floor vs pflm's federated round, scaling, variants, eval, time to ppl.

    .venv/bin/python scripts/bench.py --preset issue10 [--threads 2] [--sections floor,scaling,variants,eval,ttp]

Prints ONE JSON document. The floor is a plain torch loop (embedding -> nn.LSTM -> Linear on the valid positions,
cross entropy, SGD) that trains one model on exactly the token batches of one round's cohort, in the same order and
shapes (built by `pflm.device.batching.device_setup/device_batches`, the functions the device trainer itself uses),
with no federation. The federated round is `Simulator.run_round` on the same cohort. Compared timings are
interleaved (floor, round, floor, round, ...) after warm-up, and medians are reported. Timings are only meaningful
on a quiet machine: the load average at the start and end of each section is recorded next to its numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from pflm.config import RecipeConfig, load_recipe
from pflm.device.batching import LocalVocab, device_batches, device_setup
from pflm.evaluation.perplexity import evaluate
from pflm.io_utils import atomic_write_text
from pflm.model.factory import build_model
from pflm.secure_random import subkey
from pflm.simulation.simulator import Simulator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peak import flops_report, matmul_peak  # noqa: E402

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
DEV = torch.device("cpu")  # --accelerator: where the floor, the matmul peak and every round compute


def sync() -> None:
    """Wait for queued GPU work, so wall-clock times cover it (no-op on the CPU)."""
    if DEV.type == "cuda":
        torch.cuda.synchronize()

# The issue-10 workload: chitchat word LM (10k vocab), 1-layer LSTM 128/256, untied softmax, cohort 50,
# 1 local epoch, batch 16, sentences truncated to 20 tokens, SGD on device, FedAvg, clipping at 0.5, no noise.
BASE = {
    "seed": 0, "data.max_tokens": 20, "data.max_sentences_per_device": 0, "model.arch": "lstm",
    "model.embedding_dim": 128, "model.hidden_dim": 256, "model.num_layers": 1, "model.tie_embeddings": False,
    "model.dropout": 0.0, "device.epochs": 1, "device.batch_size": 16, "device.lr": 1.0, "device.loss": "full",
    "server.optimizer": "fedavg", "server.lr": 1.0, "server.cohort_size": 50, "privacy.clip_bound": 0.5,
    "privacy.noise_multiplier": 0.0, "server.sampling": "fixed",  # the same cohort size every round
}
VARIANTS: dict[str, dict] = {
    "base": {},
    "peu_lora_nce": {"peu.mode": "topk", "peu.k": 2000, "model.lora.rank": 8, "model.lora.targets": "[rnn]",
                     "device.train_embeddings": True, "device.loss": "nce", "device.num_samples": 256},
    "dpsgd": {"dpsgd.enabled": True, "dpsgd.grad_sample_mode": "ghost", "dpsgd.max_grad_norm": 1.0,
              "dpsgd.noise_multiplier": 1.0},
    # the same with Opacus' step-by-step DPLSTM instead of pflm's fused one (pflm.model.fused_dplstm): before/after
    "dpsgd_opacus_lstm": {"dpsgd.enabled": True, "dpsgd.grad_sample_mode": "ghost", "dpsgd.max_grad_norm": 1.0,
                          "dpsgd.noise_multiplier": 1.0, "dpsgd.fused_lstm": False},
}
# The fastest recipe for section (g): Partial Embedding Updates with the 500 most frequent rows (devices train a
# full softmax over those rows only). Tried and slower to the target: sampled softmax (256 noise words; validation
# perplexity rises at device lr 1.0), at most 32 sentences per device (small, unclipped updates), PEU k=1000.
FAST = {"peu.mode": "topk", "peu.k": 500}

PRESETS: dict[str, dict] = {
    "issue10": {"data": "data/chitchat", "model": {}, "cohort": 50, "scaling": [10, 50, 200], "repeats": 3,
                "scaling_repeats": 2, "variant_cohorts": [10, 50, 200], "variant_budget_s": 150, "eval_users": 40, "eval_repeats": 3,
                "ttp_rounds": 10, "ttp_eval_every": 2, "ttp_val_users": 30, "ttp_max_rounds": 200},
    # the default recipe's small devices (at most 32 sentences = 2 local steps each) at cohort 100
    "default_recipe": {"data": "data/chitchat", "model": {"data.max_sentences_per_device": 32, "privacy.clip_bound": 0.3},
                       "cohort": 100, "scaling": [20, 100, 400], "repeats": 3, "scaling_repeats": 2,
                       "variant_cohorts": [100], "variant_budget_s": 60, "eval_users": 40, "eval_repeats": 3,
                       "ttp_rounds": 10, "ttp_eval_every": 2, "ttp_val_users": 30, "ttp_max_rounds": 100},
    "small": {"data": "data/chitchat", "model": {"model.embedding_dim": 32, "model.hidden_dim": 64}, "cohort": 10,
              "scaling": [5, 10, 20], "repeats": 2, "scaling_repeats": 1, "variant_cohorts": [5, 10], "variant_budget_s": 60, "eval_users": 10,
              "eval_repeats": 2, "ttp_rounds": 4, "ttp_eval_every": 2, "ttp_val_users": 10, "ttp_max_rounds": 40},
    "tiny": {"data": "data/chitchat", "model": {"model.embedding_dim": 16, "model.hidden_dim": 32,
                                               "data.max_sentences_per_device": 16}, "cohort": 4,
             "scaling": [2, 4], "repeats": 1, "scaling_repeats": 1, "variant_cohorts": [2], "variant_budget_s": 30, "eval_users": 3,
             "eval_repeats": 1, "ttp_rounds": 2, "ttp_eval_every": 1, "ttp_val_users": 3, "ttp_max_rounds": 6},
}
SECTIONS = ("floor", "flower", "scaling", "parallel", "vectorize", "variants", "eval", "ttp")  # "floor" includes the FLOPs/peak report


def load() -> float:
    return os.getloadavg()[0]


def make_recipe(data_dir: str, out_dir: str, threads: int, *layers: dict) -> RecipeConfig:
    """A validated recipe from BASE plus override layers (later layers win)."""
    merged: dict = {**BASE, "threads": threads, "data.dir": data_dir, "output_dir": out_dir, "name": "bench"}
    for layer in layers:
        merged.update(layer)
    ovs = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in merged.items()]
    return load_recipe(None, ovs)


def cohort_batches(sim: Simulator, round_idx: int) -> tuple[list[int], list[Batch]]:
    """The round's cohort and, in device order, every (inputs, targets, mask) its devices train on."""
    cohort, per_device = device_batch_lists(sim, round_idx)
    return cohort, [b for bs in per_device for b in bs]


def device_batch_lists(sim: Simulator, round_idx: int) -> tuple[list[int], list[list[Batch]]]:
    """The round's cohort and, per device, the (inputs, targets, mask) batches it trains on."""
    cfg = sim.cfg
    plan = sim.server.plan_round(round_idx)
    lv = LocalVocab(sim.vocab_size, plan.rows)
    batches: list[list[Batch]] = []
    for user in plan.cohort:
        # the simulator's key of this device (its run key is secret unless privacy.reproducible; the bench
        # process owns the simulator, so it may read it)
        key = subkey(sim.run_key, "device", round_idx, user)
        rng, _, seqs, lengths = device_setup(sim.fd.user_tokens("train", user), key,
                                             cfg.data.max_sentences_per_device, cfg.data.max_tokens)
        batches.append(list(device_batches(seqs, lengths, rng, cfg.device.epochs, cfg.device.batch_size, lv)))
    return plan.cohort, batches


class Floor:
    """Plain torch: one LSTM LM and one SGD optimizer, trained over a list of batches; no federation."""

    def __init__(self, sim: Simulator, threads: int) -> None:
        cfg = sim.cfg
        self.threads = threads
        if cfg.model.arch != "lstm" or cfg.model.tie_embeddings or cfg.model.lora.enabled or cfg.dpsgd.enabled \
                or cfg.device.loss != "full" or cfg.device.optimizer != "sgd" or cfg.device.momentum:
            raise ValueError("the floor is defined for the untied full-softmax LSTM trained with plain SGD")
        self.model = build_model(cfg.model, sim.vocab_size).to(DEV)
        self.model.load_state_dict(sim.server.model.state_dict())
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.device.lr)

    def train(self, batches: list[Batch]) -> float:
        m, opt = self.model, self.opt
        m.train()
        torch.set_num_threads(self.threads)  # one model on all the threads (a simulator may have set fewer)
        t0 = time.perf_counter()
        for inputs, targets, mask in batches:
            h, _ = m.rnn(m.embedding(inputs))
            loss = F.cross_entropy(m.output(h[mask]), targets[mask])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sync()
        return time.perf_counter() - t0


def timed_round(sim: Simulator, round_idx: int) -> float:
    t0 = time.perf_counter()
    m = sim.run_round(round_idx)
    sync()
    if "failed" in m:
        raise RuntimeError(f"round failed: {m['failed']}")
    return time.perf_counter() - t0


def interleaved(fns: dict, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Run each fn in turn (a, b, a, b, ...) warmup + repeats times; return the timed repeats per name."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(warmup + repeats):
        for k, fn in fns.items():
            t = fn()
            if i >= warmup:
                out[k].append(t)
    return out


def work(batches: list[Batch]) -> dict[str, int]:
    return {"steps": len(batches), "target_tokens": int(sum(int(b[2].sum()) for b in batches))}


def floor_vs_round(sim: Simulator, round_idx: int, warmup: int, repeats: int, threads: int) -> dict:
    cohort, batches = cohort_batches(sim, round_idx)
    batches = [tuple(t.to(DEV) for t in b) for b in batches]  # type: ignore[misc]
    floor = Floor(sim, threads)
    la = load()
    t = interleaved({"floor": lambda: floor.train(batches), "round": lambda: timed_round(sim, round_idx)}, warmup, repeats)
    f, r = statistics.median(t["floor"]), statistics.median(t["round"])
    w = work(batches)
    return {"cohort": len(cohort), **w, "floor_seconds": f, "round_seconds": r, "round_over_floor": r / f,
            "devices_per_second": len(cohort) / r, "floor_devices_per_second": len(cohort) / f,
            "tokens_per_second": w["target_tokens"] / r, "floor_runs": t["floor"], "round_runs": t["round"],
            "load_avg": [la, load()]}


def variant_speed(mk, variant: str, cohorts: list[int], round_idx: int, floor_secs: dict[int, float],
                  budget_s: float) -> dict:
    """Round time of a recipe variant per cohort size (after one warm-up round at the smallest). A cohort whose
    predicted time (seconds per training sentence so far x its sentences) exceeds budget_s is skipped, with the
    prediction reported."""
    out: dict = {}
    per_sentence = 0.0
    try:
        for i, c in enumerate(cohorts):
            sim = Simulator(mk(VARIANTS[variant], {"server.cohort_size": c}))
            plan_users = sim.server.plan_round(round_idx).cohort
            cap = sim.cfg.data.max_sentences_per_device
            n_sent = int(sum(min(int(sim.fd.split("train").counts[u]), cap or 1 << 62) for u in plan_users))
            if per_sentence * n_sent > budget_s:
                out[str(c)] = {"skipped": f"predicted {per_sentence * n_sent:.0f} s > budget {budget_s:.0f} s",
                               "sentences": n_sent}
                continue
            if i == 0:
                timed_round(sim, round_idx)  # warm-up (Opacus wrapping, allocator)
            la = load()
            secs = timed_round(sim, round_idx)
            per_sentence = secs / max(n_sent, 1)
            out[str(c)] = {"round_seconds": secs, "devices_per_second": c / secs, "sentences": n_sent,
                           "load_avg": [la, load()]}
            if c in floor_secs:
                out[str(c)]["over_base_floor"] = secs / floor_secs[c]
    except Exception as e:  # noqa: BLE001 - report the failure as data, keep the other sections
        return {"result": None, "error": f"{type(e).__name__}: {e}", "partial": out}
    return out


def parallel_gain(mk, round_idx: int, repeats: int, threads: int, workers: list[int]) -> dict:
    """Round time of the same cohort with 1, 2, ... devices trained at once (threads split between them),
    interleaved, next to the floor on all threads: what training several simulated devices at once gains."""
    sims = {w: Simulator(mk({"device_workers": w})) for w in workers}
    _, batches = cohort_batches(sims[workers[0]], round_idx)
    batches = [tuple(t.to(DEV) for t in b) for b in batches]  # type: ignore[misc]
    floor = Floor(sims[workers[0]], threads)
    fns = {"floor": lambda: floor.train(batches)}
    fns.update({f"device_workers={w}": (lambda s=s: timed_round(s, round_idx)) for w, s in sims.items()})
    la = load()
    t = interleaved(fns, 1, repeats)
    med = {k: statistics.median(v) for k, v in t.items()}
    base = med[f"device_workers={workers[0]}"]
    return {"seconds": med, "runs": t, "over_floor": {k: v / med["floor"] for k, v in med.items()},
            "gain_over_one_device_at_a_time": {k: base / v for k, v in med.items() if k != "floor"},
            "load_avg": [la, load()]}


def vectorize_gain(mk, round_idx: int, repeats: int, groups: list[int]) -> dict:
    """Round time of the same cohort with devices trained one at a time (device.vectorize=1) and G at a time
    (pflm.device.vectorized), interleaved after a warm-up: devices per second before and after (issue 21)."""
    sims = {g: Simulator(mk({"device.vectorize": g})) for g in groups}
    cohort = len(sims[groups[0]].server.plan_round(round_idx).cohort)
    fns = {f"vectorize={g}": (lambda s=s: timed_round(s, round_idx)) for g, s in sims.items()}
    la = load()
    t = interleaved(fns, 1, repeats)
    med = {k: statistics.median(v) for k, v in t.items()}
    base = med[f"vectorize={groups[0]}"]
    return {"cohort": cohort, "seconds": med, "runs": t, "devices_per_second": {k: cohort / v for k, v in med.items()},
            "speedup": {k: base / v for k, v in med.items()}, "load_avg": [la, load()]}


def eval_speed(sim: Simulator, repeats: int) -> dict:
    es = sim.val_set
    evaluate(sim.server.model, es)
    la = load()
    secs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        evaluate(sim.server.model, es)
        secs.append(time.perf_counter() - t0)
    s = statistics.median(secs)
    return {"tokens": es.num_tokens, "seconds": s, "tokens_per_second": es.num_tokens / s, "runs": secs,
            "load_avg": [la, load()]}


def time_to_ppl(mk, p: dict, fast: dict) -> dict:
    """Full-softmax recipe for ttp_rounds rounds (its final validation perplexity is the target) and the fast
    recipe, trained in lockstep (one round of each in turn, so load drift hits both alike). Times are the sums
    of round times; evaluation (fast: every round, full: every ttp_eval_every) is not counted."""
    la = load()
    val = {"data.val_users": p["ttp_val_users"]}
    full_sim, fast_sim = Simulator(mk(val)), Simulator(mk(val, fast))
    full_tr: list[dict] = []
    fast_tr: list[dict] = []
    full_s = fast_s = 0.0
    target: float | None = None
    reached = None
    for r in range(max(p["ttp_rounds"], p["ttp_max_rounds"])):
        if r < p["ttp_rounds"]:
            full_s += timed_round(full_sim, r)
            if (r + 1) % p["ttp_eval_every"] == 0 or r + 1 == p["ttp_rounds"]:
                ppl = evaluate(full_sim.server.model, full_sim.val_set)["perplexity"]
                full_tr.append({"round": r + 1, "train_seconds": round(full_s, 3), "val_perplexity": round(ppl, 3)})
            if r + 1 == p["ttp_rounds"]:
                target = full_tr[-1]["val_perplexity"]
                hits = [t for t in fast_tr if t["val_perplexity"] <= target]
                reached = hits[0] if hits else None
        if reached is not None or (target is not None and fast_s > full_s):
            break
        fast_s += timed_round(fast_sim, r)
        ppl = evaluate(fast_sim.server.model, fast_sim.val_set)["perplexity"]
        fast_tr.append({"round": r + 1, "train_seconds": round(fast_s, 3), "val_perplexity": round(ppl, 3)})
        if target is not None and ppl <= target:
            reached = fast_tr[-1]
    return {"target_val_perplexity": target,
            "full_recipe": {"rounds": p["ttp_rounds"], "train_seconds": full_s, "trace": full_tr},
            "fast_recipe": {"overrides": fast, "reached": reached, "trace": fast_tr},
            "speedup": (full_s / reached["train_seconds"]) if reached else None, "load_avg": [la, load()]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="issue10", choices=sorted(PRESETS))
    ap.add_argument("--data", help="a `pflm prepare` directory (default: the preset's)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads of the floor and of every round (set explicitly)")
    ap.add_argument("--device-workers", type=int, default=2,
                    help="simulated devices trained at once in the timed rounds (the threads are split between them)")
    ap.add_argument("--round", type=int, default=0, help="round index whose cohort is timed")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list from {','.join(SECTIONS)}")
    ap.add_argument("--fast", default="", help="extra k=v overrides of the fast recipe (space separated)")
    ap.add_argument("--repeats", type=int, help="timed repeats of each compared run (default: the preset's)")
    ap.add_argument("--variant-cohorts", help="comma list of cohort sizes for the variants section (default: the preset's)")
    ap.add_argument("--variants", default="peu_lora_nce,dpsgd,dpsgd_opacus_lstm", help="variants section: which ones")
    ap.add_argument("--groups", default="8,32", help="vectorize section: devices per batched computation")
    ap.add_argument("--accelerator", default="cpu", choices=("cpu", "cuda"), help="cuda: floor, peak and rounds on "
                    "the GPU (device.accelerator=cuda; scripts/gpu_check.sh)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    p = dict(PRESETS[args.preset])
    if args.variant_cohorts:
        p["variant_cohorts"] = [int(c) for c in args.variant_cohorts.split(",")]
    if args.repeats:
        p["repeats"] = p["scaling_repeats"] = p["eval_repeats"] = args.repeats
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {bad}; choose from {list(SECTIONS)}")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    global DEV
    DEV = torch.device(args.accelerator)
    fast = dict(FAST)
    fast.update(dict(kv.split("=", 1) for kv in args.fast.split()))
    tmp = tempfile.mkdtemp(prefix="pflm_bench_")
    data = args.data or p["data"]

    def mk(*layers: dict) -> RecipeConfig:
        return make_recipe(data, tmp, args.threads, p["model"], {"data.val_users": p["eval_users"],
                           "server.cohort_size": p["cohort"], "device_workers": args.device_workers,
                           "device.accelerator": args.accelerator}, *layers)

    doc: dict = {"preset": args.preset, "data": data, "threads": args.threads, "device_workers": args.device_workers,
                 "accelerator": args.accelerator,
                 "torch": torch.__version__,
                 "cpu_count": os.cpu_count(), "round": args.round, "command": " ".join(["scripts/bench.py", *sys.argv[1:]]),
                 "load_avg_start": list(os.getloadavg()), "recipe": {**BASE, **p["model"], "server.cohort_size": p["cohort"]}}
    t_all = time.perf_counter()
    base_sim = Simulator(mk())
    floor_secs: dict[int, float] = {}
    if "floor" in sections:
        res = floor_vs_round(base_sim, args.round, 1, p["repeats"], args.threads)
        main_res = dict(res)
        doc["floor"] = {k: res[k] for k in ("cohort", "steps", "target_tokens", "floor_seconds", "floor_runs")}
        doc["round"] = {k: res[k] for k in ("round_seconds", "round_runs", "devices_per_second", "tokens_per_second")}
        doc["round_over_floor"] = res["round_over_floor"]
        doc["floor_load_avg"] = res["load_avg"]
        floor_secs[p["cohort"]] = res["floor_seconds"]
        per_batch = max(1, res["target_tokens"] // max(res["steps"], 1))  # the output layer's rows per step
        peak = matmul_peak(args.threads, [(2048, 2048, 2048), (per_batch, base_sim.cfg.model.output_dim,
                                                                base_sim.vocab_size)], dev=DEV)
        doc["flops"] = flops_report(base_sim.cfg, base_sim.vocab_size, res["target_tokens"],
                                    {"floor": res["floor_seconds"], "round": res["round_seconds"]}, peak)
    if "flower" in sections:  # a plain Flower FedAvg app on the same per-device batches (scripts/flower_baseline.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import flower_baseline

        _, per_device = device_batch_lists(base_sim, args.round)
        doc["flower_baseline"] = flower_baseline.bench_section(
            base_sim.cfg, base_sim.vocab_size, base_sim.server.model.state_dict(), per_device, 1 + p["repeats"],
            doc.get("floor", {}).get("floor_seconds"), doc.get("round", {}).get("round_seconds"), load)
        torch.set_num_threads(args.threads)
    if "scaling" in sections:
        doc["scaling"] = {}
        for c in p["scaling"]:
            if c == p["cohort"] and "floor" in sections:
                res = dict(main_res)  # the same measurement as sections (a)-(c)
            else:
                res = floor_vs_round(Simulator(mk({"server.cohort_size": c})), args.round, 0, p["scaling_repeats"],
                                     args.threads)
            res.pop("floor_runs"), res.pop("round_runs")
            doc["scaling"][str(c)] = res
            floor_secs[c] = res["floor_seconds"]
        ratios = [v["round_over_floor"] for v in doc["scaling"].values()]
        doc["scaling_round_over_floor_spread"] = max(ratios) / min(ratios)
    if "parallel" in sections:
        doc["parallel"] = parallel_gain(mk, args.round, p["repeats"], args.threads, sorted({1, args.threads}))
    if "vectorize" in sections:
        doc["vectorize"] = vectorize_gain(mk, args.round, p["repeats"], [1, *[int(g) for g in args.groups.split(",")]])
    if "variants" in sections:
        doc["variants"] = {v: variant_speed(mk, v, p["variant_cohorts"], args.round, floor_secs, p["variant_budget_s"])
                           for v in args.variants.split(",")}
    if "eval" in sections:
        doc["eval"] = eval_speed(base_sim, p["eval_repeats"])
    if "ttp" in sections:
        doc["time_to_perplexity"] = time_to_ppl(mk, p, fast)
    targets: dict = {}
    if "round_over_floor" in doc:
        targets["round_over_floor<=1.05"] = doc["round_over_floor"] <= 1.05
    if "scaling_round_over_floor_spread" in doc:
        targets["scaling_spread<=1.10"] = doc["scaling_round_over_floor_spread"] <= 1.10
    if "time_to_perplexity" in doc:
        sp = doc["time_to_perplexity"]["speedup"]
        targets["time_to_ppl_speedup>=3"] = sp is not None and sp >= 3
    doc["targets_met"] = targets
    shutil.rmtree(tmp, ignore_errors=True)
    doc["load_avg_end"] = list(os.getloadavg())
    doc["wall_seconds"] = time.perf_counter() - t_all
    text = json.dumps(doc, indent=1)
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
