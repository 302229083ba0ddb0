"""A malicious server against honest devices: every attack of issue 15 is refused (the old device code accepted each)."""

from __future__ import annotations

import dataclasses
import secrets

import numpy as np
import pytest
import torch

from pflm.aggregator.base import RoundContext
from pflm.aggregator.secagg import SecAggConfig, SecureAggregator, shamir
from pflm.aggregator.secagg.client import ProtocolViolation, SecAggClient
from pflm.aggregator.secagg.graph import harary_graph
from pflm.aggregator.secagg.masking import Session
from pflm.aggregator.secagg.messages import DeviceRegistry, UnmaskRequest
from pflm.aggregator.secagg.protocol import SecAggServer
from pflm.errors import AggregationFailed

DIM = 64


def make_session(cfg: SecAggConfig, n: int, **over) -> Session:
    k, t = cfg.round_parameters(n)
    fields = dict(session_id=secrets.token_bytes(16), round=1, bits=cfg.bits, threshold=t,
                  x_of={u: u for u in range(1, n + 1)}, degree=k, malicious=cfg.malicious)
    fields.update(over)
    return Session(**fields)


class Round:
    """An honest cohort driven step by step by a test that plays the (possibly malicious) server."""

    def __init__(self, cfg: SecAggConfig, n: int = 8, **session_over) -> None:
        self.cfg = cfg
        self.session = make_session(cfg, n, **session_over)
        self.registry = DeviceRegistry()
        ids = {u: self.registry.enrol(u) for u in self.session.cohort}
        self.clients = {u: SecAggClient(u, self.session, cfg, ids[u], self.registry) for u in self.session.cohort}
        self.server = SecAggServer(self.session, self.registry)

    def advertise(self) -> None:
        self.server.receive_advertisements([c.advertise() for c in self.clients.values()])

    def share(self) -> None:
        self.outboxes = {u: c.share_keys(*self.server.share_keys_request(u)) for u, c in self.clients.items()}
        self.inboxes = self.server.route_shares(self.outboxes)
        self.server.receive_complaints({v: self.clients[v].receive_shares(box) for v, box in self.inboxes.items()})

    def mask(self) -> dict[int, np.ndarray]:
        x = np.zeros(DIM, dtype=self.session.dtype)
        return {u: c.masked_input(x, self.server.mask_list(u)) for u, c in self.clients.items()}

    def up_to_masking(self) -> Round:
        self.advertise()
        self.share()
        for u, y in self.mask().items():
            self.server.receive_masked(u, y)
        return self


def cfg_(**kw) -> SecAggConfig:
    kw.setdefault("rounding", "seeded")
    return SecAggConfig(**kw)


# ------------------------------------------------------------------ neighbour lists
def test_empty_mask_list_is_refused() -> None:
    """Old code: masked_input(x, []) returned x + PRG(b_u); the server then asked u's neighbours for b_u's shares
    (u survived) and subtracted PRG(b_u): x in the clear, no colluder needed."""
    r = Round(cfg_())
    r.advertise()
    r.share()
    victim = r.clients[3]
    with pytest.raises(ProtocolViolation, match="fewer than the threshold"):
        victim.masked_input(np.zeros(DIM, dtype=np.uint32), [])
    with pytest.raises(ProtocolViolation, match="has left the round"):  # and it sends nothing more
        victim.masked_input(np.zeros(DIM, dtype=np.uint32), r.server.mask_list(3))


def test_empty_and_short_neighbour_lists_are_refused_at_key_sharing() -> None:
    r = Round(cfg_(neighbours=4), n=12)
    r.advertise()
    ads, mine = r.server.share_keys_request(5)
    with pytest.raises(ProtocolViolation, match="not its graph neighbourhood"):
        r.clients[5].share_keys(ads, [])
    with pytest.raises(ProtocolViolation, match="not its graph neighbourhood"):
        r.clients[6].share_keys(ads, r.server.share_keys_request(6)[1][:2])
    # hiding the other devices' advertisements leaves it without enough neighbours to share safely
    with pytest.raises(ProtocolViolation, match="neighbours advertised keys"):
        r.clients[7].share_keys({7: ads[7]})


def test_short_mask_list_is_refused() -> None:
    r = Round(cfg_(neighbours=4), n=12)
    r.advertise()
    r.share()
    t = r.session.threshold
    with pytest.raises(ProtocolViolation, match="fewer than the threshold"):
        r.clients[2].masked_input(np.zeros(DIM, dtype=np.uint32), r.server.mask_list(2)[: t - 1])


def test_sparse_graph_below_the_device_floor_is_refused() -> None:
    cfg = cfg_()  # complete graph: a device expects n − 1 neighbours
    with pytest.raises(ProtocolViolation, match="below the device's floor"):
        Round(cfg, n=10, degree=2, threshold=2)
    cfg = cfg_(neighbours=4, min_neighbours=4)
    Round(cfg, n=10)  # its own floor is accepted


# ------------------------------------------------------------------ thresholds
@pytest.mark.parametrize("t", [1, 2, 3])
def test_low_thresholds_are_refused(t: int) -> None:
    """Old code accepted any threshold in the round message; with t = 1 every share *is* the secret, and with
    t ≤ k/2 the dropout lie needs no colluder."""
    with pytest.raises(ProtocolViolation, match=f"threshold {t} is outside"):
        Round(cfg_(), n=7, threshold=t)  # k = 6: floor ⌈0.6·6⌉ = 4


def test_malicious_variant_needs_two_thirds() -> None:
    cfg = cfg_(malicious=True)
    with pytest.raises(ProtocolViolation, match="threshold 4 is outside"):
        Round(cfg, n=7, threshold=4)  # k = 6: needs > 4
    with pytest.raises(ProtocolViolation, match="requires the malicious-server variant"):
        Round(cfg, n=7, malicious=False)


# ------------------------------------------------------------------ the dropout lie
def _lie(r: Round, victim: int, camp_a: set[int]) -> dict[str, dict[int, int]]:
    """Tell camp A "victim survived" and everyone else "victim dropped"; collect what honest devices reveal."""
    u3 = set(r.server.u3)
    got: dict[str, dict[int, int]] = {"self": {}, "key": {}}
    for v in sorted(r.server.graph[victim]):
        view = u3 if v in camp_a else u3 - {victim}
        mine = r.server.graph[v] & r.server.u2
        req = UnmaskRequest(tuple(sorted(mine & view)), tuple(sorted(mine - view)), tuple(sorted(view)))
        try:
            resp = r.clients[v].unmask(req)
        except ProtocolViolation:
            continue
        if victim in resp.self_mask_shares:
            got["self"][r.session.x_of[v]] = resp.self_mask_shares[victim]
        if victim in resp.key_shares:
            got["key"][r.session.x_of[v]] = resp.key_shares[victim]
    return got


def test_dropout_lie_without_colluders_cannot_collect_both_secrets() -> None:
    """Semi-honest variant: each honest neighbour reveals one share kind, and t > k/2, so no split of the
    neighbours yields t shares of both b_u and s_sk_u (old code: threshold 0.5 or a server-sent t allowed it)."""
    r = Round(cfg_(), n=9).up_to_masking()
    k, t = r.session.degree, r.session.threshold
    nbrs = sorted(r.server.graph[1])
    got = _lie(r, 1, set(nbrs[: k // 2]))
    assert 2 * t > k and not (len(got["self"]) >= t and len(got["key"]) >= t)


def test_dropout_lie_fails_the_consistency_check() -> None:
    """Malicious variant: every survivor signs the U3 it was told; a device answers only with ≥ t neighbour
    signatures on the same set. The lie's two camps sign different sets, and 2t > k + (colluders) means
    neither camp reaches t: every honest device refuses, nothing is revealed."""
    r = Round(cfg_(malicious=True), n=7).up_to_masking()
    victim, u3 = 1, set(r.server.u3)
    t = r.session.threshold
    views = {v: (u3 if v in {1, 2, 3, 4} else u3 - {victim}) for v in sorted(u3)}
    sigs: dict[frozenset, dict[int, bytes]] = {}
    for v, view in views.items():
        sigs.setdefault(frozenset(view), {})[v] = r.clients[v].sign_survivors(sorted(view))
    assert all(len(s) < t for s in sigs.values())
    revealed = 0
    for v, view in views.items():
        if v == victim:
            continue
        mine = r.server.graph[v] & r.server.u2
        req = UnmaskRequest(tuple(sorted(mine & view)), tuple(sorted(mine - view)), tuple(sorted(view)),
                            sigs[frozenset(view)])
        with pytest.raises(ProtocolViolation, match="valid neighbour signatures"):
            revealed += len(r.clients[v].unmask(req).key_shares)
    assert revealed == 0


def test_consistency_check_rejects_a_set_it_did_not_sign_and_forged_signatures() -> None:
    r = Round(cfg_(malicious=True), n=7).up_to_masking()
    u3 = sorted(r.server.u3)
    sigs = {v: r.clients[v].sign_survivors(u3) for v in u3 if v != 2}
    with pytest.raises(ProtocolViolation, match="differs from the one it signed"):
        mine = r.server.graph[3] & r.server.u2
        r.clients[3].unmask(UnmaskRequest(tuple(sorted(mine - {1})), (1,), tuple(v for v in u3 if v != 1), sigs))
    r.clients[2].sign_survivors(u3)
    forged = {v: bytes(64) for v in u3}
    mine = r.server.graph[2] & r.server.u2
    with pytest.raises(ProtocolViolation, match="valid neighbour signatures"):
        r.clients[2].unmask(UnmaskRequest(tuple(sorted(mine)), (), tuple(u3), forged))


# ------------------------------------------------------------------ both share kinds of one device
def test_both_share_kinds_of_one_device_are_refused() -> None:
    r = Round(cfg_(), n=7).up_to_masking()
    mine = sorted(r.server.graph[2] & r.server.u2)
    with pytest.raises(ProtocolViolation, match="both survivors and dropped"):
        r.clients[2].unmask(tuple(mine), (mine[0],))
    r.clients[3].unmask(r.server.unmask_request(3))
    with pytest.raises(ProtocolViolation, match="second unmasking request"):  # old code: a second request for
        r.clients[3].unmask(tuple(m for m in mine if m != 1 and m != 3), (1,))  # other owners was answered


def test_survivors_and_dropped_must_split_the_mask_list() -> None:
    r = Round(cfg_(), n=7).up_to_masking()
    mine = sorted(r.server.graph[4] & r.server.u2)
    with pytest.raises(ProtocolViolation, match="not the mask list"):
        r.clients[4].unmask(tuple(mine[:-1]), ())  # a neighbour it masked with is left out
    r2 = Round(cfg_(), n=7).up_to_masking()
    mine = sorted(r2.server.graph[4] & r2.server.u2)
    with pytest.raises(ProtocolViolation, match="surviving neighbours, fewer than the threshold"):
        r2.clients[4].unmask(tuple(mine[:1]), tuple(mine[1:]))  # "everyone else dropped": single-input sum


# ------------------------------------------------------------------ nonces and replays
def test_nonces_are_unique_and_bound_to_the_session() -> None:
    r = Round(cfg_(), n=8)
    r.advertise()
    r.share()
    nonces = [m.nonce for box in r.outboxes.values() for m in box.values()]
    assert len(set(nonces)) == len(nonces) and bytes(12) not in nonces  # old code: one all-zero nonce


def test_replayed_ciphertext_is_refused() -> None:
    r = Round(cfg_(), n=8)
    r.advertise()
    r.outboxes = {u: c.share_keys(*r.server.share_keys_request(u)) for u, c in r.clients.items()}
    inboxes = r.server.route_shares(r.outboxes)
    box = dict(inboxes[1])
    a, b = sorted(box)[:2]
    box[b] = dataclasses.replace(box[a], sender=b)  # the same ciphertext and nonce relabelled
    with pytest.raises(ProtocolViolation, match="repeated nonce or ciphertext"):
        r.clients[1].receive_shares(box)
    # a message from another session (replayed) carries that session's nonce: refused too
    other = Round(cfg_(), n=8)
    other.advertise()
    old = other.clients[3].share_keys(*other.server.share_keys_request(3))[2]
    box = dict(inboxes[2])
    box[3] = old
    with pytest.raises(ProtocolViolation, match="unique .* nonce"):
        r.clients[2].receive_shares(box)


# ------------------------------------------------------------------ the graph
def test_server_chosen_graph_is_refused() -> None:
    """Old code: the graph came from graph_seed(recipe seed, round), fixed by the operator; now each device
    recomputes it from the hash of all advertised keys and refuses any other neighbourhood."""
    r = Round(cfg_(neighbours=4), n=12)
    r.advertise()
    ads, mine = r.server.share_keys_request(1)
    # e.g. chosen to surround 1 with colluders; the real graph is random (fresh keys), so pick a choice that differs
    chosen = next(g for i in range(100) if sorted((g := harary_graph(r.session.cohort, 4, b"operator-%d" % i))[1]) != mine)
    assert sorted(chosen[1]) != mine
    with pytest.raises(ProtocolViolation, match="not its graph neighbourhood"):
        r.clients[1].share_keys(ads, sorted(chosen[1]))


def test_altered_advertisements_are_refused() -> None:
    r = Round(cfg_(malicious=True, neighbours=4), n=12)
    r.advertise()
    ads, mine = r.server.share_keys_request(1)
    ads_own = dict(ads)
    ads_own[1] = dataclasses.replace(ads[1], b_commit=bytes(32))
    with pytest.raises(ProtocolViolation, match="own key advertisement"):
        r.clients[1].share_keys(ads_own, mine)
    ads_other = dict(ads)  # a key swapped in by the server (to grind the graph, or to impersonate device 5)
    ads_other[5] = dataclasses.replace(ads[5], s_pk=ads[5].c_pk[::-1])
    with pytest.raises(ProtocolViolation, match="no valid signature"):
        r.clients[2].share_keys(ads_other, r.server.share_keys_request(2)[1])


# ------------------------------------------------------------------ misbehaving devices drop themselves, not the round
def _updates(n: int) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {u: torch.randn(DIM, generator=g) / 20 for u in range(10, 10 + n)}


def _aggregate(cfg: SecAggConfig, ups: dict[int, torch.Tensor]):
    agg = SecureAggregator(cfg)
    agg.begin(RoundContext(round=2, dim=DIM, cohort=sorted(ups), clip_bound=1.0, seed=1))
    for u, x in ups.items():
        agg.add(u, x, 1.0, {})
    return agg, agg.finalize()


@pytest.mark.parametrize("malicious", [False, True])
def test_bad_shares_from_one_device_drop_only_that_device(monkeypatch, malicious: bool) -> None:
    ups = _updates(9)
    bad = 13
    original = SecAggClient.share_keys

    def garbage(self, *a, **kw):
        out = original(self, *a, **kw)
        if self.device_id == bad:
            out = {v: dataclasses.replace(m, ciphertext=secrets.token_bytes(len(m.ciphertext))) for v, m in out.items()}
        return out

    monkeypatch.setattr(SecAggClient, "share_keys", garbage)
    agg, res = _aggregate(cfg_(malicious=malicious), ups)
    assert agg.contributors == [u for u in sorted(ups) if u != bad]
    want = sum(ups[u].double() for u in agg.contributors)
    assert (res.total.double() - want).abs().max().item() <= res.metrics["secagg_quant_error_bound"] + 1e-6


def test_wrong_length_masked_vector_drops_that_device() -> None:
    ups = _updates(8)
    agg = SecureAggregator(cfg_())
    agg.begin(RoundContext(round=2, dim=DIM, cohort=sorted(ups), clip_bound=1.0, seed=1))
    for u, x in ups.items():
        up = agg.upload(u, x, 1.0, {})
        if u == 12:
            up = dataclasses.replace(up, payload=up.payload[:-1])
        agg.receive(up)
    res = agg.finalize()
    assert 12 not in agg.contributors and res.num_contributors == 7 and res.metrics["secagg_misbehaving"] == 1


def test_too_many_misbehaving_devices_fail_safely(monkeypatch) -> None:
    ups = _updates(7)
    original = SecAggClient.unmask

    def refuse(self, *a, **kw):
        if self.device_id % 2:
            raise ProtocolViolation("test: refuses")
        return original(self, *a, **kw)

    monkeypatch.setattr(SecAggClient, "unmask", refuse)
    with pytest.raises(AggregationFailed, match="valid shares, threshold"):
        _aggregate(cfg_(), ups)


def test_malicious_variant_round_is_exact_and_signed() -> None:
    ups = _updates(10)
    agg, res = _aggregate(cfg_(malicious=True, neighbours=6), ups)
    assert res.num_contributors == 10 and agg.session.malicious
    assert all(ad.signature for ad in agg.server.ads.values()) and len(agg.server.signatures) == 10
    want = sum(x.double() for x in ups.values())
    assert (res.total.double() - want).abs().max().item() <= res.metrics["secagg_quant_error_bound"] + 1e-6
    assert shamir.PRIME > 1 << 520


def test_a_refusing_device_leaves_and_the_round_goes_on(monkeypatch) -> None:
    ups = _updates(9)
    original = SecAggClient.receive_shares

    def refuse(self, inbox):
        if self.device_id == 15:
            self._refuse("test: it saw something it did not like")
        return original(self, inbox)

    monkeypatch.setattr(SecAggClient, "receive_shares", refuse)
    agg, res = _aggregate(cfg_(), ups)
    assert 15 not in agg.contributors and res.num_contributors == 8
    assert list(agg.protocol.refusals) == [15] and res.metrics["secagg_refusals"] == 1
    want = sum(ups[u].double() for u in agg.contributors)
    assert (res.total.double() - want).abs().max().item() <= res.metrics["secagg_quant_error_bound"] + 1e-6
