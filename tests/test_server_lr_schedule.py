"""Server lr schedule (`server.lr_schedule`): cosine decay matches torch's CosineAnnealingLR, every optimizer
step uses it, it is public (released per round as server_lr) and a resumed run continues it exactly."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from pflm.config import ServerConfig, load_recipe
from pflm.driver.metrics import RELEASED
from pflm.errors import PflmError
from pflm.server.optimizer import ServerOptimizer
from pflm.simulation.simulator import Simulator
from tests.conftest import crash_at_round, tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"
DP = {"privacy.noise_multiplier": 0.8, "server.optimizer": "fedadam", "server.lr": 0.05, "peu.mode": "sampled",
      "peu.k": 50, "server.checkpoint_every": 1, "server.rounds": 5,
      "server.lr_schedule": "cosine", "server.lr_final": 0.005}


def test_cosine_matches_torch_cosine_annealing():
    rounds, lr, final = 40, 0.1, 0.002
    opt = ServerOptimizer(ServerConfig(rounds=rounds, lr=lr, lr_schedule="cosine", lr_final=final))
    p = torch.nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.SGD([p], lr=lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=rounds - 1, eta_min=final)
    for step in range(1, rounds + 1):  # step s of ours is epoch s-1 of torch's
        assert opt.lr_at(step) == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12, abs=1e-15), step
        ref_opt.step()
        ref.step()
    assert opt.lr_at(1) == lr and opt.lr_at(rounds) == pytest.approx(final)
    assert opt.lr_at(rounds + 7) == pytest.approx(final)  # steps past the plan stay at the final lr


@pytest.mark.parametrize("optimizer, momentum", [("fedavg", 0.0), ("fedavg", 0.9), ("fedadam", 0.0)])
def test_every_step_uses_the_scheduled_lr(optimizer, momentum):
    cfg = ServerConfig(rounds=4, lr=0.3, lr_schedule="cosine", lr_final=0.01, optimizer=optimizer, momentum=momentum)
    sched = ServerOptimizer(cfg)
    manual = ServerOptimizer(dataclasses.replace(cfg, lr_schedule="constant", lr_final=0.0))
    g = torch.Generator().manual_seed(3)
    a = {"emb": torch.randn(6, 4, generator=g), "w": torch.randn(5, generator=g)}
    b = {k: v.clone() for k, v in a.items()}
    for step in range(1, 5):
        rows = torch.tensor([0, 2, 5]) if step % 2 else None
        upd = {"emb": (torch.randn(3 if rows is not None else 6, 4, generator=g), rows), "w": (torch.randn(5, generator=g), None)}
        sched.step(a, upd)
        manual.cfg = dataclasses.replace(manual.cfg, lr=sched.lr_at(step))  # a constant lr set by hand each step
        manual.step(b, upd)
        for k in a:
            assert torch.equal(a[k], b[k]), (step, k)
    assert sched.lr_at(4) < sched.lr_at(1)


def test_cosine_with_final_equal_to_lr_is_the_constant_lr_bit_for_bit():
    flat = ServerOptimizer(ServerConfig(rounds=9, lr=0.07, lr_schedule="cosine", lr_final=0.07))
    assert all(flat.lr_at(s) == 0.07 for s in range(1, 12))


def _sim(data, out, **extra):
    return Simulator(load_recipe(RECIPE, tiny_overrides(data, out, **{**DP, **extra})))


def test_schedule_is_released_and_a_resumed_run_continues_it(synthetic_data, tmp_path, monkeypatch):
    _sim(synthetic_data, str(tmp_path / "a")).run(progress=False)
    crash_at_round(_sim(synthetic_data, str(tmp_path / "b")), monkeypatch, 3)
    _sim(synthetic_data, str(tmp_path / "b")).run(progress=False)
    a = load_file(str(tmp_path / "a" / "tiny_synthetic" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "tiny_synthetic" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed run stepped with the same lrs
    rows = [json.loads(x) for x in (tmp_path / "b" / "tiny_synthetic" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["round"]: r["server_lr"] for r in rows if "server_lr" in r}
    ref = ServerOptimizer(ServerConfig(rounds=5, lr=0.05, lr_schedule="cosine", lr_final=0.005))
    assert sorted(lrs) == list(range(5))  # DP run: server_lr reached metrics.jsonl, so it is in the released set
    assert [lrs[r] for r in range(5)] == pytest.approx([ref.lr_at(s) for s in range(1, 6)])
    assert "server_lr" in RELEASED


@pytest.mark.parametrize("change, key", [({"server.lr_final": 0.01}, "server.lr_final"),
                                         ({"server.rounds": 8}, "server.rounds")])
def test_changing_the_schedule_mid_run_is_refused(synthetic_data, tmp_path, monkeypatch, change, key):
    # a cosine run's lr is a function of its planned length too: extending it would jump the lr back up
    crash_at_round(_sim(synthetic_data, str(tmp_path)), monkeypatch, 2)
    with pytest.raises(PflmError, match=key):
        _sim(synthetic_data, str(tmp_path), **change)


def test_a_constant_lr_run_may_still_be_extended(synthetic_data, tmp_path, monkeypatch):
    const = {"server.lr_schedule": "constant", "server.lr_final": 0.0}
    crash_at_round(_sim(synthetic_data, str(tmp_path), **const), monkeypatch, 2)
    assert _sim(synthetic_data, str(tmp_path), **const, **{"server.rounds": 6}).run(progress=False)["rounds"] == 6


@pytest.mark.parametrize("extra, msg", [
    ({"server.lr_final": 0.5}, r"server.lr_final must be in \[0, server.lr\]"),
    ({"server.lr_schedule": "constant"}, "server.lr_final applies to server.lr_schedule=cosine"),
    ({"server.lr_schedule": "linear"}, "lr_schedule"),
    ({"privacy.mechanism": "dpftrl", "server.sampling": "available", "peu.mode": "all"}, "constant server lr"),
])
def test_bad_schedule_settings_are_refused(synthetic_data, tmp_path, extra, msg):
    with pytest.raises(PflmError, match=msg):
        load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path), **{**DP, **extra}))
