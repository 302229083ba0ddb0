"""A plain Flower FedAvg app on the bench's workload: the baseline `scripts/bench.py --sections flower` times.

No pflm code runs inside Flower here: the ServerApp is Flower's own `FedAvg` strategy (Message API, flwr 1.42),
each virtual SuperNode is one device of the round's cohort and its ClientApp trains the floor's model
(embedding -> nn.LSTM -> Linear on the valid positions, cross entropy, plain SGD) on exactly the batches that device
trains on in pflm (`bench.cohort_batches`), clips its delta to L2 norm C (the workload's clipping) and returns the
weights. Ray runs the ClientApps (`num_cpus` per client, as pflm's Flower backend). Round time = time between the
strategy's centralised-evaluation callbacks (a no-op), so start-up is excluded; round 1 includes the actors'
first import of torch and is reported apart.

    python scripts/flower_baseline.py BATCHES.pt   (a file written by `save_job`; bench.py does this for you)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

JOB_ENV = "PFLM_FLOWER_BASELINE_JOB"
_STATE: dict = {}


def save_job(path: Path, model_cfg: dict, vocab_size: int, state_dict: dict, batches: list[list[tuple]],
             lr: float, clip: float, threads: int) -> None:
    """Everything a client needs, in one torch file the Ray actors load once: model shape, initial weights,
    per-device batches (index = Flower partition id), SGD lr, clip bound, torch threads per client."""
    import torch

    torch.save({"model_cfg": model_cfg, "vocab": vocab_size, "state": state_dict, "batches": batches, "lr": lr,
                "clip": clip, "threads": threads}, path)


def _job() -> dict:
    if not _STATE:
        import torch

        from pflm.model.factory import build_model
        from pflm.model.options import ModelConfig

        job = torch.load(os.environ[JOB_ENV], weights_only=False)
        torch.set_num_threads(job["threads"])
        job["model"] = build_model(ModelConfig(**job["model_cfg"]), job["vocab"])
        _STATE.update(job)
    return _STATE


def _client_app():
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch
        from torch.nn import functional as F

        job = _job()
        m = job["model"]
        m.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        m.train()
        start = [p.detach().clone() for p in m.parameters()]
        opt = torch.optim.SGD(m.parameters(), lr=job["lr"])
        for inputs, targets, mask in job["batches"][int(context.node_config["partition-id"])]:
            h, _ = m.rnn(m.embedding(inputs))
            loss = F.cross_entropy(m.output(h[mask]), targets[mask])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():  # clip the update (trained - start) to L2 norm C
            norm = torch.sqrt(sum(((p - s) ** 2).sum() for p, s in zip(m.parameters(), start)))
            scale = min(1.0, job["clip"] / (float(norm) + 1e-12))
            for p, s in zip(m.parameters(), start):
                p.sub_(s).mul_(scale).add_(s)
        content = RecordDict({"arrays": ArrayRecord(m.state_dict()), "metrics": MetricRecord({"num-examples": 1})})
        return Message(content=content, reply_to=msg)

    return app


def _server_app(num_nodes: int, rounds: int, result: dict):
    from flwr.app import ArrayRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        job = _job()
        stamps: list[float] = []

        def stamp(server_round: int, arrays: ArrayRecord) -> None:
            stamps.append(time.perf_counter())
            return None

        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=num_nodes,
                          min_evaluate_nodes=0, min_available_nodes=num_nodes)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(job["model"].state_dict()), num_rounds=rounds,
                       evaluate_fn=stamp)
        result["round_seconds"] = [b - a for a, b in zip(stamps, stamps[1:])]

    return app


def run_baseline(job_path: Path, num_nodes: int, rounds: int = 2, cpus_per_client: float = 1.0) -> dict:
    """Run the Flower FedAvg app for `rounds` rounds on `num_nodes` SuperNodes; returns per-round seconds and wall."""
    os.environ[JOB_ENV] = str(job_path)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    here = str(Path(__file__).resolve().parent)  # the Ray actors import this module by name
    os.environ["PYTHONPATH"] = os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])
    if here not in sys.path:
        sys.path.insert(0, here)
    from flwr.simulation import run_simulation

    result: dict = {}
    cpus = os.cpu_count() or 1
    t0 = time.perf_counter()
    run_simulation(server_app=_server_app(num_nodes, rounds, result), client_app=_client_app(),
                   num_supernodes=num_nodes, backend_name="ray",
                   backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "num_gpus": 0, "include_dashboard": False,
                                                 "logging_level": "error", "object_store_memory": 300 << 20}})
    result["wall_seconds"] = time.perf_counter() - t0
    if len(result.get("round_seconds", [])) != rounds:
        raise RuntimeError(f"the Flower baseline did not finish its {rounds} rounds: {result}")
    return result


def bench_section(cfg, vocab_size: int, state_dict: dict, per_device: list, rounds: int, floor_s: float | None,
                  round_s: float | None, load) -> dict:
    """bench.py's `flower` section: the app on `per_device` batches (one SuperNode per device, one CPU and one
    torch thread per client), steady round time (first round = actor warm-up, excluded) and its ratios."""
    import dataclasses
    import shutil
    import statistics
    import tempfile

    job = Path(tempfile.mkdtemp(prefix="pflm_flower_baseline_")) / "job.pt"
    save_job(job, dataclasses.asdict(cfg.model), vocab_size, state_dict, per_device, cfg.device.lr,
             cfg.privacy.clip_bound, 1)
    la = load()
    try:
        res = run_baseline(job, len(per_device), rounds=rounds, cpus_per_client=1.0)
    except Exception as e:  # noqa: BLE001 - report the failure as data, keep the other sections
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        shutil.rmtree(job.parent, ignore_errors=True)
    steady = statistics.median(res["round_seconds"][1:] or res["round_seconds"])
    out = {"cohort": len(per_device), "round_seconds": steady, "round_runs": res["round_seconds"],
           "wall_seconds": res["wall_seconds"], "devices_per_second": len(per_device) / steady,
           "load_avg": [la, load()],
           "what": "Flower 1.42 FedAvg (Message API), Ray, one SuperNode per device, 1 CPU per client; first round "
                   "(actor warm-up) excluded from round_seconds"}
    if floor_s:
        out["over_floor"] = steady / floor_s
    if round_s:
        out["over_pflm_round"] = steady / round_s
    return out


if __name__ == "__main__":
    import torch

    path = Path(sys.argv[1])
    n = len(torch.load(path, weights_only=False)["batches"])
    print(json.dumps(run_baseline(path, n), indent=1))
