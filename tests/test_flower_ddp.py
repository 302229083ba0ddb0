"""Distributed DP over Flower: the devices on the nodes add their own noise shares inside the secure sum (issue 18).

On the LoopGrid the real ClientApp functions run the device half (rotation → γ → conditional rounding → the device's
noise share from its own key → mask mod 2^w); the ServerApp runs only the server half and unmasks a sum that already
carries the noise. Checked: the released model equals the in-process distributed run's bit for bit (reproducible
mode); the server's unmasked sum minus the noise-free sum has the calibrated variance (reproducible keys recompute
the noise-free sum; with fresh node keys the released error has the calibrated std); and the attacker tests — a
server that asks for a zero share, shrinks the shares (a false dropout tolerance / deployment size), asks for a
wrap-around-certain modulus, or asks a node that requires distributed DP for a plain sum, is refused by the nodes'
own policy: they send no masked vector and the model stays untouched.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
from flwr.app import Array, Message
from safetensors.torch import load_file

from pflm.aggregator.secagg.remote import RemoteSecureAggregator
from pflm.config import load_recipe
from pflm.flower import ddp_node, secure_node
from pflm.flower.policy import POLICY_ENV, policy_from_recipe
from pflm.flower.server_app import flower_driver
from pflm.schema import to_dict
from pflm.secure_random import derive_key, subkey
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides
from tests.test_flower_secagg import StageGrid, _result, _task_identity, recorded  # noqa: F401 (fixtures)
from tests.test_flower_server import RECIPE, _cfg, _metrics, node_policy_file  # noqa: F401 (autouse fixture)

DDP = {"privacy.mechanism": "distributed_skellam", "aggregation.kind": "secure", "privacy.target_epsilon": 6,
       "privacy.noise_multiplier": "null", "privacy.population": 100000, "server.sampling": "poisson",
       "server.cohort_size": 9, "server.rounds": 1, "privacy.distributed.bits": 20,
       "privacy.distributed.k_stddevs": 6}  # 6 std devs inside the modulus: no coordinate wraps in these tests


def _wrapped(v: np.ndarray, m: int) -> np.ndarray:
    """v reduced mod 2^m into [−2^(m−1), 2^(m−1)): integer sums compared as the server sees them."""
    return (v + (1 << (m - 1))) % (1 << m) - (1 << (m - 1))


def _ddp_cfg(data, tmp_path, policy=None, **extra):
    """A Flower recipe with distributed DP; `policy` (dict) replaces the nodes' distributed policy."""
    cfg = _cfg(data, tmp_path, **{**DDP, **extra})
    pol = to_dict(policy_from_recipe(cfg))
    if policy is not None:
        pol["distributed"].update(policy)
    with open(os.environ[POLICY_ENV], "w") as f:
        json.dump(pol, f)
    return cfg


def _tamper(field, value):
    def tamper(stage, msg, p):
        if stage == "train":
            blob = secure_node.read_blob(msg.content)
            blob["codec"][field] = value(blob["codec"][field]) if callable(value) else value
            msg.content[secure_node.SECAGG] = secure_node.blob_record(blob)
    return tamper


def _train_replies(grid):
    return [c for stage, _, c in grid.seen if stage == "train"]


# ---------------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("mechanism", ["distributed_skellam", "distributed_dgauss"])
def test_flower_ddp_matches_the_inprocess_run_bit_for_bit(synthetic_data, tmp_path, mechanism):
    """Same users, same seed-derived device keys (reproducible mode), so the same rounding, the same noise shares
    and the same integer sum: the released models are identical, and so is the accountant's ε."""
    extra = {"privacy.mechanism": mechanism, "server.rounds": 2, "privacy.noise_cohort": 500}
    cfg = _ddp_cfg(synthetic_data, tmp_path / "fl", **extra)
    sim = flower_driver(cfg, StageGrid([0, 1, 2], 3))
    assert isinstance(sim.aggregator, RemoteSecureAggregator) and sim.aggregator.codec_factory is not None
    summary = sim.run(progress=False)
    ref = load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "ip"), **{**DDP, **extra}))
    ref_summary = Simulator(ref).run(progress=False)
    a, b = load_file(str(cfg.run_dir / "model.safetensors")), load_file(str(ref.run_dir / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert summary["epsilon"] == ref_summary["epsilon"] and 0 < summary["epsilon"] <= 6
    fl = _metrics(cfg)
    assert len(fl) == 2 and all("failed" not in m and m["noise_std_sum"] > 0 for m in fl)


def test_server_view_minus_noise_free_sum_has_the_calibrated_variance(synthetic_data, tmp_path, recorded):
    """Attacker = the ServerApp. Reproducible keys let the test recompute every device's rounding: the unmasked
    integer sum minus Σ x̃ has variance n·v (n devices × the share variance the server asked for) — the server
    never holds the noise-free sum."""
    cfg = _ddp_cfg(synthetic_data, tmp_path, **{"privacy.noise_cohort": 9})
    grid = StageGrid([0, 1, 2], 3)
    sim = flower_driver(cfg, grid)
    sim.run_round(0)
    agg = sim.aggregator
    codec = agg.codec
    users = sorted(recorded)
    assert len(users) == len(agg._contributed) >= 3
    run = subkey(derive_key(cfg.seed), "secagg-rounding")
    quantised = sum(codec.quantise(recorded[u], subkey(run, "upload", 0, u)) for u in users)
    residual = _wrapped(codec.centred(agg.last_sum) - quantised, codec.scale.modulus_bits)
    v = codec.scale.share_variance
    assert residual.var() == pytest.approx(len(users) * v, rel=0.05)
    assert abs(residual.mean()) < 5 * math.sqrt(len(users) * v / residual.size)
    # the server's other views: each masked vector is D·m bits packed + the tail words (the payload), and looks
    # nothing like a device's encoding (the top 4 of its m bits are uniform)
    m = codec.scale.modulus_bits
    bufs = [a.numpy() for c in _train_replies(grid) for a in c.array_records[secure_node.MASKED].values()]
    assert len(bufs) == len(users)
    assert all(b.dtype == np.uint8 and b.size == (codec.rotated * m + 7) // 8 + 4 * codec.tail.length for b in bufs)
    words = np.concatenate([ddp_node.unpack_masked(b, codec.rotated, m, codec.length, np.uint32)[: codec.rotated]
                            for b in bufs])
    top = np.bincount((words >> np.uint32(m - 4)).astype(np.int64), minlength=16)
    assert np.sum((top - words.size / 16) ** 2 / (words.size / 16)) < 45  # chi² with 15 d.o.f., P ≈ 7e-5


def test_fresh_node_keys_give_the_calibrated_noise(synthetic_data, tmp_path, recorded):
    """Default (non-reproducible) node policy: each device's noise comes from a fresh OS-CSPRNG key on its node.
    The released sum minus the exact float sum has the calibrated std √(n·v + n/4)/γ (shares + rounding)."""
    cfg = _ddp_cfg(synthetic_data, tmp_path, **{"privacy.reproducible": "false", "privacy.noise_cohort": 9})
    sim = flower_driver(cfg, StageGrid([0, 1, 2], 3))
    results = _result(sim)
    sim.run_round(0)
    res, codec = results[0], sim.aggregator.codec
    n = res.num_contributors
    exact = np.sum([recorded[u].astype(np.float64) for u in recorded], axis=0)
    err = res.total.numpy().astype(np.float64) - exact
    expect = math.sqrt(n * codec.scale.share_variance + n / 4.0) / codec.scale.gamma
    assert err.std() == pytest.approx(expect, rel=0.06)


# ---------------------------------------------------------------------------------------------------- attackers
def _refused_round(cfg, tamper=None):
    grid = StageGrid([0, 1, 2], 3, tamper=tamper)
    sim = flower_driver(cfg, grid)
    before = {k: v.clone() for k, v in sim.server.model.state_dict().items()}
    m = sim.run_round(0)
    assert "failed" in m and sim.server.rounds_done == 0
    for k, v in sim.server.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    replies = _train_replies(grid)
    assert replies and all(len(c.array_records[secure_node.MASKED]) == 0 for c in replies)  # nothing masked sent
    return [why for c in replies for why in secure_node.read_blob(c)["refused"].values()]


def test_a_server_asking_for_a_zero_noise_share_is_refused(synthetic_data, tmp_path):
    cfg = _ddp_cfg(synthetic_data, tmp_path)  # even the simulation policy (no noise floor) refuses it
    reasons = _refused_round(cfg, _tamper("share_variance", 0.0))
    assert reasons and all("zero share is refused" in r for r in reasons)


def test_a_server_shrinking_the_shares_is_refused_by_the_node_floor(synthetic_data, tmp_path):
    """The server claims a 10× larger deployment / dropout tolerance (shares 10× smaller). The devices compute the
    noise their honest shares give in the smallest sum the session lets the server unmask, from values they trust
    (cohort size and threshold of the session, their own corrupt-device assumption): below the floor → refused.
    The honest request passes the same floor."""
    probe = _ddp_cfg(synthetic_data, tmp_path / "probe", **{"privacy.noise_cohort": 9})
    sim = flower_driver(probe, StageGrid([0, 1, 2], 3))
    sim.aggregator.begin(sim.server.plan_round(0).ctx)
    cp = sim.aggregator.codec_params()
    z = ddp_node.node_noise_multiplier(cp, sim.aggregator.session, policy_from_recipe(probe).secagg)
    assert z > 0
    floor = {"min_noise_multiplier": 0.8 * z}
    ok = flower_driver(_ddp_cfg(synthetic_data, tmp_path / "ok", floor, **{"privacy.noise_cohort": 9}),
                       StageGrid([0, 1, 2], 3))
    assert "failed" not in ok.run_round(0)
    cfg = _ddp_cfg(synthetic_data, tmp_path / "lie", floor, **{"privacy.noise_cohort": 9})
    reasons = _refused_round(cfg, _tamper("share_variance", lambda v: v / 10))
    assert reasons and all("below the node's floor" in r for r in reasons)


@pytest.mark.parametrize("field,value,needle", [
    ("modulus_bits", 3, "wrap-around would be near-certain"),
    ("mechanism", "distributed_dgauss", "not allowed"),
    ("l2", 1e-3, "conditional rounding could never succeed"),
    ("n", 1000, "does not match the session"),
])
def test_other_unsafe_requests_are_refused(synthetic_data, tmp_path, field, value, needle):
    reasons = _refused_round(_ddp_cfg(synthetic_data, tmp_path), _tamper(field, value))
    assert reasons and all(needle in r for r in reasons)


def test_a_node_requiring_distributed_dp_refuses_a_plain_sum(synthetic_data, tmp_path):
    """A server that switches back to central DP (it would see the exact sum) is refused by nodes whose owners
    require distributed DP."""
    cfg = _cfg(synthetic_data, tmp_path, **{"server.rounds": 1, "server.cohort_size": 8, "aggregation.kind": "secure"})
    pol = to_dict(policy_from_recipe(cfg))
    pol["distributed"]["required"] = True
    with open(os.environ[POLICY_ENV], "w") as f:
        json.dump(pol, f)
    reasons = _refused_round(cfg)
    assert reasons and all("requires distributed DP" in r for r in reasons)


def test_a_malformed_packed_vector_drops_only_that_device(synthetic_data, tmp_path, recorded):
    """A node sends one device's packed vector truncated (or as 32-bit words): the server drops that device only;
    the others are unmasked (the dropped device's masks are removed by the protocol) and the released sum is
    exactly theirs plus their noise."""
    bad = {}

    def stray(stage, rep, msg, p):
        if stage != "train" or bad:
            return None
        arrays = rep.content.array_records[secure_node.MASKED]
        key = sorted(arrays)[0]
        bad[key] = True
        arrays[key] = Array(arrays[key].numpy()[:-1].copy())
        return Message(rep.content, reply_to=msg)

    cfg = _ddp_cfg(synthetic_data, tmp_path, **{"privacy.noise_cohort": 9, "aggregation.secagg.threshold": 0.51})
    sim = flower_driver(cfg, StageGrid([0, 1, 2], 3, stray=stray))
    m = sim.run_round(0)
    agg = sim.aggregator
    assert bad and "failed" not in m, m.get("failed")
    dropped = agg.user_of[int(next(iter(bad)))]
    kept = [u for u in recorded if u != dropped]
    assert len(agg._contributed) == len(kept)
    run = subkey(derive_key(cfg.seed), "secagg-rounding")
    codec = agg.codec
    expect = sum(codec.quantise(recorded[u], subkey(run, "upload", 0, u)) + codec.noise_share(subkey(run, "upload", 0, u))
                 for u in kept)
    assert np.array_equal(codec.centred(agg.last_sum), _wrapped(expect, codec.scale.modulus_bits))
