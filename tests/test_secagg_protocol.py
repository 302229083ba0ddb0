"""End-to-end secure-aggregation tests: exact sums, dropouts, safe failure, bad input, simulate ≡ full."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pflm.aggregator.base import RoundContext
from pflm.aggregator.plain import PlainSumAggregator
from pflm.aggregator.secagg import SecAggConfig, SecureAggregator
from pflm.aggregator.secagg.client import SecAggClient
from pflm.aggregator.secagg.fixed_point import rounding_key
from pflm.aggregator.secagg.protocol import SecAggServer
from pflm.errors import AggregationFailed

DIM = 1000


def seeded_config(**kwargs) -> SecAggConfig:
    """These tests recompute each device's encoding, so they opt into the reproducible (not secret) rounding."""
    kwargs.setdefault("rounding", "seeded")
    return SecAggConfig(**kwargs)


def updates(n: int, seed: int = 0, dim: int = DIM, clip: float = 1.0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for u in range(n):
        x = torch.randn(dim, generator=g)
        out[10 + 7 * u] = (x * clip / x.norm() * torch.rand(1, generator=g)).float()
    return out


def run(cfg: SecAggConfig, ups: dict[int, torch.Tensor], drop: tuple[int, ...] = (), seed: int = 5, rnd: int = 3,
        graph_seed: bytes | None = None):
    extra = {} if graph_seed is None else {"secagg_graph_seed": graph_seed}
    ctx = RoundContext(round=rnd, dim=DIM, cohort=sorted(ups), clip_bound=1.0, seed=seed, extra=extra)
    agg = SecureAggregator(cfg)
    agg.begin(ctx)
    for u, x in ups.items():
        if u in drop:
            agg.drop(u)
        else:
            agg.add(u, x, 1.0, {"clipped": float(u % 2)})
    return agg, ctx


def quantised_sum(agg: SecureAggregator, ctx: RoundContext, ups: dict[int, torch.Tensor]) -> np.ndarray:
    """Σ over contributors of their encoded integers, computed independently (Python ints, then mod 2^b)."""
    assert agg.codec is not None
    total = np.zeros(agg.codec.length, dtype=object)
    for u in agg.contributors:
        rng = rounding_key(ctx.seed, ctx.round, u)
        total += agg.codec.encode(ups[u].double().numpy(), 1.0, {"clipped": float(u % 2)}, rng).ints.astype(object)
    return np.array([int(v) % (1 << agg.config.bits) for v in total], dtype=np.uint64)


@pytest.mark.parametrize("neighbours", ["full", 4, "log"])
def test_revealed_sum_is_exact(neighbours) -> None:
    ups = updates(12)
    agg, ctx = run(seeded_config(neighbours=neighbours), ups)
    res = agg.finalize()
    assert agg.last_sum is not None
    assert np.array_equal(agg.last_sum.astype(np.uint64), quantised_sum(agg, ctx, ups))
    plain = PlainSumAggregator()
    plain.begin(ctx)
    for u, x in ups.items():
        plain.add(u, x, 1.0, {"clipped": float(u % 2)})
    ref = plain.finalize()
    err = (res.total.double() - ref.total.double()).abs().max().item()
    assert err <= res.metrics["secagg_quant_error_bound"] + 1e-6  # + float32 rounding of the output
    assert res.weight_sum == pytest.approx(12.0) and res.aux["clipped"] == pytest.approx(ref.aux["clipped"])
    assert res.num_contributors == 12 and res.metrics["secagg_wraps"] == 0
    assert res.metrics["secagg_bytes_per_device_mean"] > DIM * 4


def test_dropouts_below_threshold_recover_exact_survivor_sum() -> None:
    ups = updates(12)
    dropped = tuple(sorted(ups)[1:4])
    agg, ctx = run(seeded_config(threshold=0.6), ups, drop=dropped)  # degree 11, t = 7, 9 survivors
    res = agg.finalize()
    assert agg.contributors == [u for u in sorted(ups) if u not in dropped]
    assert np.array_equal(agg.last_sum.astype(np.uint64), quantised_sum(agg, ctx, ups))
    assert res.metrics["secagg_dropped_after_sharing"] == 3 and res.num_contributors == 9
    want = sum(ups[u].double() for u in agg.contributors)
    assert (res.total.double() - want).abs().max().item() <= res.metrics["secagg_quant_error_bound"] + 1e-6


def test_simulated_dropouts_at_every_stage_sparse_graph() -> None:
    ups = updates(20)
    cfg = seeded_config(neighbours=8, threshold=0.55, dropout_share=0.05, dropout_masked_input=0.1, dropout_unmask=0.05)
    counts = []
    for seed in range(12):  # the key-derived graph is fresh each time: some rounds (correctly) fail safely
        agg, ctx = run(cfg, ups, seed=seed)
        try:
            res = agg.finalize()
        except AggregationFailed as e:
            assert "threshold 5" in str(e)
            continue
        assert np.array_equal(agg.last_sum.astype(np.uint64), quantised_sum(agg, ctx, ups))
        assert res.num_contributors == len(agg.contributors)
        counts.append(res.num_contributors)
    assert len(counts) >= 4 and min(counts) < 20  # most rounds succeed, and the seeds above do drop devices


def test_too_many_dropouts_fail_safely() -> None:
    ups = updates(10)
    agg, _ = run(seeded_config(threshold=0.6), ups, drop=tuple(sorted(ups)[:5]))  # t = 6, 5 survivors
    with pytest.raises(AggregationFailed, match="fewer than the threshold 6"):
        agg.finalize()
    assert agg.last_sum is None
    # no secret was revealed: the round stopped before any unmasking request
    assert agg.server is not None and agg.server.requested == {}


def test_too_few_unmask_answers_fail_safely() -> None:
    agg, _ = run(seeded_config(neighbours=4, threshold=1.0, dropout_unmask=0.5), updates(12))
    with pytest.raises(AggregationFailed, match="answered the unmasking request"):
        agg.finalize()


def test_failure_at_key_sharing_and_tiny_cohort() -> None:
    agg, _ = run(seeded_config(dropout_advertise=0.8), updates(10))
    with pytest.raises(AggregationFailed, match="completed key sharing"):
        agg.finalize()
    agg, _ = run(seeded_config(), updates(2))
    with pytest.raises(AggregationFailed, match="at least 3 devices"):
        agg.finalize()


def test_wrong_length_and_bad_input() -> None:
    ups = updates(8)
    agg = SecureAggregator(seeded_config())
    ctx = RoundContext(round=0, dim=DIM, cohort=sorted(ups), clip_bound=1.0, seed=0)
    agg.begin(ctx)
    with pytest.raises(AggregationFailed, match="device 17 sent an update of length 999"):
        agg.add(17, torch.zeros(DIM - 1), 1.0)
    agg.add(10, ups[10], 1.0, {"clipped": 0.0})
    with pytest.raises(AggregationFailed, match="two updates"):
        agg.add(10, ups[10], 1.0)
    with pytest.raises(AggregationFailed, match="not in the cohort"):
        agg.add(999, ups[10], 1.0)
    with pytest.raises(AggregationFailed, match="aux_keys"):
        agg.add(24, ups[24], 1.0, {"surprise": 1.0})
    bad = ups[31].clone()
    bad[3] = float("nan")
    agg.add(31, bad, 1.0)  # excluded like a dropout
    for u in (17, 38, 45, 52, 59):
        agg.add(u, ups[u], 1.0)
    res = agg.finalize()
    assert res.num_contributors == 6 and res.metrics["secagg_excluded_nonfinite"] == 1


def _flip_one_ciphertext(victims: set[tuple[int, int]]):
    original = SecAggServer.route_shares

    def route(self, outboxes):
        inboxes = original(self, outboxes)
        for sender, receiver in victims:
            msg = inboxes[receiver][sender]
            ct = bytearray(msg.ciphertext)
            ct[20] ^= 1
            inboxes[receiver][sender] = dataclasses.replace(msg, ciphertext=bytes(ct))
        return inboxes

    return route


def test_tampered_share_is_excluded(monkeypatch) -> None:
    ups = updates(8)
    ids = sorted(ups)
    monkeypatch.setattr(SecAggServer, "route_shares", _flip_one_ciphertext({(ids[0], ids[1])}))
    agg, ctx = run(seeded_config(), ups)
    res = agg.finalize()
    assert res.metrics["secagg_bad_shares"] == 1
    assert np.array_equal(agg.last_sum.astype(np.uint64), quantised_sum(agg, ctx, ups))


def test_too_many_tampered_shares_drop_that_device_not_the_round(monkeypatch) -> None:
    ups = updates(8)
    ids = sorted(ups)
    monkeypatch.setattr(SecAggServer, "route_shares", _flip_one_ciphertext({(ids[0], v) for v in ids[1:5]}))
    agg, ctx = run(seeded_config(threshold=0.6), ups)  # degree 7, t = 5: only 3 good shares of device ids[0]
    res = agg.finalize()  # the holders complained before masking: ids[0] left U2, nobody masked with it
    assert agg.contributors == ids[1:] and res.num_contributors == 7
    assert res.metrics["secagg_excluded_not_in_key_sharing"] == 1
    assert np.array_equal(agg.last_sum.astype(np.uint64), quantised_sum(agg, ctx, ups))


def test_wrong_revealed_share_drops_the_liar_not_the_round(monkeypatch) -> None:
    ups = updates(8)
    victim, liar = sorted(ups)[2], sorted(ups)[5]
    original = SecAggClient.unmask

    def lying_unmask(self, *args, **kwargs):
        resp = original(self, *args, **kwargs)
        if self.device_id == liar:
            resp.self_mask_shares[victim] += 1  # a wrong share: it does not match the owner's public tag
        return resp

    monkeypatch.setattr(SecAggClient, "unmask", lying_unmask)
    agg, ctx = run(seeded_config(), ups)
    res = agg.finalize()
    assert agg.server.misbehaving == {liar: "revealed a share that does not match its public tag"}
    assert res.metrics["secagg_misbehaving"] == 1 and res.num_contributors == 8  # its own input still counts
    assert np.array_equal(agg.last_sum.astype(np.uint64), quantised_sum(agg, ctx, ups))


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),
        dict(bits=20, neighbours="log"),
        dict(bits=48, neighbours=10, threshold=0.55, dropout_share=0.05, dropout_masked_input=0.1, dropout_unmask=0.05),
        dict(neighbours=7, threshold=0.55, dropout_advertise=0.05, dropout_masked_input=0.15),
        dict(neighbours=3, threshold=1.0, dropout_masked_input=0.3),  # mostly fails: both modes must agree
    ],
)
def test_simulate_mode_is_bit_exact(cfg: dict) -> None:
    ups = updates(16, seed=1)
    successes = 0
    for seed in range(6):
        sums, results, graph = [], [], None
        for mode in ("full", "simulate"):  # simulate replays the full round's key-derived graph
            agg, _ = run(seeded_config(mode=mode, **cfg), ups, drop=(sorted(ups)[3],), seed=seed, graph_seed=graph)
            graph = agg.graph_seed
            try:
                results.append(agg.finalize())
                sums.append(agg.last_sum)
            except AggregationFailed as e:
                results.append(str(e))
                sums.append(None)
        if sums[0] is None:
            assert results[0] == results[1]  # same safe failure in both modes
            continue
        assert sums[0].dtype == sums[1].dtype and np.array_equal(sums[0], sums[1])
        assert torch.equal(results[0].total, results[1].total)
        assert results[0].weight_sum == results[1].weight_sum and results[0].aux == results[1].aux
        assert results[0].num_contributors == results[1].num_contributors
        successes += 1
    assert successes >= (0 if cfg.get("neighbours") == 3 else 2)


def test_simulate_mode_large_sweep_matches_independent_sum() -> None:
    ups = updates(20, seed=2)
    failures = 0
    for seed in range(20):
        agg, ctx = run(seeded_config(mode="simulate", neighbours="log", dropout_masked_input=0.1), ups, seed=seed)
        try:
            agg.finalize()
        except AggregationFailed as e:  # a sparse neighbourhood lost too many devices: a safe failure
            assert "threshold" in str(e)
            failures += 1
            continue
        assert np.array_equal(agg.last_sum.astype(np.uint64), quantised_sum(agg, ctx, ups))
    assert failures <= 10


def test_clamped_values_are_counted_and_reported() -> None:
    ups = {u: torch.zeros(DIM) for u in (1, 2, 3, 4, 5)}
    for x in ups.values():
        x[:3] = 0.9  # beyond the coordinate bound C · value_bound_factor = 0.5
    agg, _ = run(seeded_config(value_bound_factor=0.5, mode="full"), ups)
    res = agg.finalize()
    assert res.metrics["secagg_wraps"] == 15
    assert torch.allclose(res.total[:3], torch.full((3,), 2.5)) and res.total[3:].abs().max() == 0


def test_fresh_rounding_randomness_still_decodes_within_bound() -> None:
    ups = updates(6)
    sums = []
    for _ in range(2):
        agg, _ = run(seeded_config(rounding="urandom", bits=24), ups)
        res = agg.finalize()
        want = sum(x.double() for x in ups.values())
        assert (res.total.double() - want).abs().max().item() <= res.metrics["secagg_quant_error_bound"] + 1e-6
        sums.append(agg.last_sum)
    assert not np.array_equal(sums[0], sums[1])


def test_calls_out_of_order_fail_clearly() -> None:
    agg = SecureAggregator()
    with pytest.raises(AggregationFailed, match="before begin"):
        agg.add(1, torch.zeros(3), 1.0)
    with pytest.raises(AggregationFailed, match="before begin"):
        agg.finalize()
    agg.drop(1)  # harmless


def test_recipe_factory_uses_the_run_seed() -> None:
    from pflm.aggregator.secagg import make_secure_aggregator

    ups = updates(6)
    agg = make_secure_aggregator({"mode": "simulate", "neighbours": "4", "rounding": "seeded"}, seed=5)
    assert agg.config.neighbours == 4
    ctx = RoundContext(round=3, dim=DIM, cohort=sorted(ups), clip_bound=1.0, seed=123)
    agg.begin(ctx)
    for u, x in ups.items():
        agg.add(u, x, 1.0, {"clipped": float(u % 2)})
    agg.finalize()
    ref, _ = run(seeded_config(mode="simulate", neighbours=4), ups, seed=5, rnd=3)  # ctx.seed = 5
    ref.finalize()
    assert np.array_equal(agg.last_sum, ref.last_sum)
