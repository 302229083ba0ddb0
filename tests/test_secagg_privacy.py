"""What the server holds reveals nothing about one device: masked inputs look uniform, even after its own unmasking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy.stats import chi2_contingency, chisquare, kstest

from pflm.aggregator.base import RoundContext
from pflm.aggregator.secagg import SecAggConfig, SecureAggregator, shamir
from pflm.aggregator.secagg.client import ProtocolViolation
from pflm.aggregator.secagg.fixed_point import rounding_key
from pflm.aggregator.secagg.masking import MaskStream, pair_sign, pairwise_key, self_mask_key

DIM = 2000
P_MIN = 1e-5  # a correct protocol fails a check with probability ~1e-5 per check


def uniform_pvalues(words: np.ndarray, bits: int = 32) -> tuple[float, float]:
    """(chi-square over 64 bins of the top 6 bits, KS against U[0,1)) for words uniform in Z_{2^bits}."""
    w = words.astype(np.uint64)
    counts = np.bincount((w >> np.uint64(bits - 6)).astype(np.int64), minlength=64)
    return chisquare(counts).pvalue, kstest(w.astype(np.float64) / 2.0**bits, "uniform").pvalue


def corr(words: np.ndarray, x: np.ndarray) -> float:
    return float(np.corrcoef(words[: x.size].astype(np.float64), x)[0, 1])


def round_with_transcript(n: int = 8, drop: int | None = None, neighbours="full"):
    C = math.sqrt(DIM)  # an all-ones update has norm exactly C
    ids = list(range(n))
    g = torch.Generator().manual_seed(0)
    ups = {0: torch.zeros(DIM), 1: torch.ones(DIM)}
    for u in ids[2:]:
        x = torch.randn(DIM, generator=g)
        ups[u] = x * (C / x.norm())
    ctx = RoundContext(round=1, dim=DIM, cohort=ids, clip_bound=C, seed=9)
    agg = SecureAggregator(SecAggConfig(keep_transcript=True, neighbours=neighbours, rounding="seeded"))
    agg.begin(ctx)
    clients = dict(agg.clients)
    late = None
    for u in ids:
        if u == drop:
            agg.drop(u)
            # The server also gets hold of the dropped device's masked input (e.g. it arrives late).
            enc = agg.codec.encode(ups[u].double().numpy(), 1.0, {}, rounding_key(ctx.seed, ctx.round, u))
            late = (enc.ints, clients[u].masked_input(enc.ints, agg.server.mask_list(u)))
        else:
            agg.add(u, ups[u], 1.0, {})
    res = agg.finalize()
    return agg, ctx, ups, clients, late, res


def test_masked_inputs_are_uniform_and_independent_of_the_update() -> None:
    agg, ctx, ups, _, _, _ = round_with_transcript()
    masked = agg.transcript["masked"]
    for u in (0, 1, 2, 3):
        chi, ks = uniform_pvalues(masked[u])
        assert chi > P_MIN and ks > P_MIN, (u, chi, ks)
        if u >= 2:
            assert abs(corr(masked[u], ups[u].double().numpy())) < 0.11  # 5σ for n = 2000
    # all-zeros and all-ones inputs give indistinguishable masked vectors (two-sample comparison of bins)
    c0 = np.bincount((masked[0] >> 26).astype(np.int64), minlength=64)
    c1 = np.bincount((masked[1] >> 26).astype(np.int64), minlength=64)
    assert chi2_contingency(np.stack([c0, c1])).pvalue > P_MIN
    # negative control: the unmasked encodings are far from uniform / strongly correlated
    enc2 = agg.codec.encode(ups[2].double().numpy(), 1.0, {}, rounding_key(ctx.seed, ctx.round, 2)).ints
    assert uniform_pvalues(enc2)[1] < 1e-10
    enc1 = agg.codec.encode(ups[1].double().numpy(), 1.0, {}, rounding_key(ctx.seed, ctx.round, 1)).ints
    assert uniform_pvalues(enc1)[0] < 1e-10
    assert corr(agg.codec.to_signed(enc2), ups[2].double().numpy()) > 0.99


def _reconstruct(agg: SecureAggregator, owner: int, kind: str) -> int:
    field = "self_mask_shares" if kind == "self" else "key_shares"
    shares = {
        agg.session.x_of[v]: getattr(r, field)[owner]
        for v, r in agg.transcript["responses"].items()
        if owner in getattr(r, field)
    }
    return shamir.reconstruct(shares, agg.threshold)


@pytest.mark.parametrize("neighbours", ["full", 4])
def test_survivor_stays_hidden_after_its_self_mask_is_removed(neighbours) -> None:
    agg, ctx, ups, _, _, res = round_with_transcript(neighbours=neighbours)
    stream = MaskStream(agg.codec.length, 32)
    for u in (1, 2, 5):
        y = agg.transcript["masked"][u].copy()
        seed = _reconstruct(agg, u, "self").to_bytes(32, "big")  # the server learns b_u for survivors
        stream.add_into(y, self_mask_key(seed, agg.session, u), -1)
        chi, ks = uniform_pvalues(y)  # x_u + Σ pairwise masks: still uniform
        assert chi > P_MIN and ks > P_MIN
        if u >= 2:
            assert abs(corr(y, ups[u].double().numpy())) < 0.11
    assert res.num_contributors == 8


def test_dropped_device_stays_hidden_and_server_never_gets_both_shares() -> None:
    d = 3
    agg, ctx, ups, clients, late, res = round_with_transcript(drop=d)
    enc_d, y_d = late
    assert res.num_contributors == 7 and agg.server.requested[d] == {"key"}
    for owner, kinds in agg.server.requested.items():
        assert len(kinds) == 1
    for r in agg.transcript["responses"].values():
        assert not set(r.self_mask_shares) & set(r.key_shares)
        assert d not in r.self_mask_shares
    # the server reconstructs d's mask key (to cancel its pairwise masks) and strips them from the late y_d ...
    sk = X25519PrivateKey.from_private_bytes(_reconstruct(agg, d, "key").to_bytes(32, "big"))
    stream = MaskStream(agg.codec.length, 32)
    y = y_d.copy()
    for v in agg.server.mask_list(d):
        stream.add_into(y, pairwise_key(sk, agg.server.ads[v].s_pk, agg.session, d, v), -pair_sign(d, v))
    # ... yet x_d + PRG(b_d) remains uniform and independent of x_d
    chi, ks = uniform_pvalues(y)
    assert chi > P_MIN and ks > P_MIN and abs(corr(y, ups[d].double().numpy())) < 0.11
    # control: b_d (which no honest device reveals) is exactly the missing piece
    stream.add_into(y, self_mask_key(clients[d]._b_seed, agg.session, d), -1)
    assert np.array_equal(y, enc_d)


def test_honest_device_refuses_to_reveal_both_share_kinds() -> None:
    d = 3
    agg, _, _, clients, _, _ = round_with_transcript(drop=d)
    v = next(iter(agg.transcript["responses"]))
    with pytest.raises(ProtocolViolation, match="second unmasking request"):
        clients[v].unmask([d], [])  # a curious server now asks for d's self-mask share
    with pytest.raises(ProtocolViolation):
        clients[v].unmask([5], [5])  # and the device has left the round
