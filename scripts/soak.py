"""Soak test: a DP run killed with SIGKILL at random moments and resumed each time ends exactly like an uninterrupted one.

    python scripts/soak.py --data DIR --rounds 300 --kills 30 --out /tmp/soak

Runs `pflm train recipes/tiny_synthetic.yaml` (adaptive clipping, PEU, FedAdam, checkpoint every round, central
DP with the default secret run key), kills it `--kills` times at random moments (including during checkpoint
and metrics writes), reruns the same command until it finishes, then trains an uninterrupted reference with the
same run key and compares: final weights bit for bit, metrics.jsonl (all but timings), the release ledger, and
ε. Prints a JSON report; exit 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

RECIPE = str(Path(__file__).resolve().parents[1] / "recipes" / "tiny_synthetic.yaml")
SETTINGS = ["model.embedding_dim=16", "model.hidden_dim=32", "server.cohort_size=6", "threads=1",
            "privacy.noise_multiplier=0.8", "privacy.adaptive_clipping.enabled=true",
            "privacy.adaptive_clipping.count_noise_std=2.0", "server.optimizer=fedadam", "server.lr=0.05",
            "peu.mode=sampled", "peu.k=50", "server.checkpoint_every=1", "server.eval_every=5"]


def _cmd(data: str, out: Path, rounds: int) -> list[str]:
    return [sys.executable, "-m", "pflm", "train", RECIPE, f"data.dir={data}", f"output_dir={out}",
            f"server.rounds={rounds}", *SETTINGS, "--no-progress"]


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def soak(data: str, out: Path, rounds: int, kills: int, seed: int = 0) -> dict:
    rng = random.Random(seed)
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    killed, runs = 0, 0
    cmd = _cmd(data, out / "soaked", rounds)
    while True:
        runs += 1
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if killed < kills:
            try:
                proc.wait(timeout=rng.uniform(1.0, 4.0))  # start-up takes ~1 s: kills land in every phase
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                killed += 1
                continue
        else:
            proc.wait()
        if proc.returncode != 0:
            raise RuntimeError(f"run {runs} failed: {proc.stderr.read().decode()[-2000:]}")
        break
    run = out / "soaked" / "tiny_synthetic"
    ref = out / "reference" / "tiny_synthetic"
    ref.mkdir(parents=True)
    shutil.copy2(run / "SECRET-run-key.bin", ref / "SECRET-run-key.bin")  # the same secret: the same releases
    subprocess.run(_cmd(data, out / "reference", rounds), env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    a, b = load_file(str(run / "model.safetensors")), load_file(str(ref / "model.safetensors"))
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (run, ref))
    report = {
        "rounds": rounds, "kills": killed, "runs": runs,
        "weights_equal": a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a),
        "metrics_equal": _metrics(run) == _metrics(ref),
        "ledger_equal": (run / "releases.jsonl").read_text() == (ref / "releases.jsonl").read_text(),
        "epsilon": sa["epsilon"], "epsilon_equal": sa["epsilon"] == sb["epsilon"],
    }
    report["ok"] = all(report[k] for k in ("weights_equal", "metrics_equal", "ledger_equal", "epsilon_equal"))
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a prepared data dir with a public vocabulary")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--kills", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="/tmp/pflm_soak")
    args = ap.parse_args()
    t0 = time.time()
    report = soak(args.data, Path(args.out), args.rounds, args.kills, args.seed)
    report["wall_seconds"] = round(time.time() - t0, 1)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
