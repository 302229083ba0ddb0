"""Server side of the protocol: routes keys and shares, sums masked inputs, and unmasks only the cohort's sum.

Also holds the survivor bookkeeping shared by both modes (who advertised, who shared keys, who can still be
recovered), so `mode="simulate"` reaches exactly the same survivor sets and failures as the full protocol on the
same graph. A device that misbehaves (bad signature, malformed message, wrong-length vector, a revealed share that
does not match its public tag) is dropped; the round fails (AggregationFailed) only below the threshold.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pflm.aggregator.secagg import shamir
from pflm.aggregator.secagg.graph import graph_seed, harary_graph
from pflm.aggregator.secagg.masking import MaskStream, Session, pair_sign, pairwise_key, self_mask_key
from pflm.aggregator.secagg.messages import (
    Advertisement,
    DeviceRegistry,
    EncryptedShare,
    UnmaskRequest,
    UnmaskResponse,
    commitment,
    share_nonce,
    share_tag,
    survivors_payload,
)
from pflm.errors import AggregationFailed

Graph = dict[int, frozenset[int]]
Complaints = Mapping[int, set[int] | frozenset[int] | list[int]]  # receiver → senders whose share failed


def key_sharing_survivors(
    graph: Graph, advertised: set[int], sent_shares: set[int], threshold: int, complaints: Complaints | None = None
) -> set[int]:
    """U2: devices that sent shares, pruned until every member has ≥ threshold neighbours in U2 holding a valid
    share of its secrets (a neighbour that complained about u's share does not count for u)."""
    complaints = complaints or {}
    alive = advertised & sent_shares
    changed = True
    while changed:
        changed = False
        for u in sorted(alive):
            holders = [v for v in graph[u] & alive if u not in complaints.get(v, ())]
            if len(holders) < threshold:
                alive.discard(u)
                changed = True
    return alive


def recovery_problem(
    graph: Graph, u2: set[int], u3: set[int], responders: set[int], threshold: int, complaints: Complaints | None = None
) -> str | None:
    """Why the sum cannot be unmasked with these responders (None if every needed secret has ≥ t holders)."""
    complaints = complaints or {}
    if len(u3) < threshold:
        return f"only {len(u3)} devices sent masked inputs, fewer than the threshold {threshold}"
    for u in sorted(u2):
        if u not in u3 and not graph[u] & u3:
            continue  # dropped, and no survivor masked with it: nothing to remove
        holders = len([v for v in graph[u] & responders if u not in complaints.get(v, ())])
        if holders < threshold:
            what = "self-mask seed" if u in u3 else "mask key (it dropped out)"
            return (
                f"cannot recover the {what} of device {u}: only {holders} of its neighbours answered the "
                f"unmasking request, threshold {threshold}"
            )
    return None


class SecAggServer:
    """The server: sees public keys, ciphertexts, masked vectors, signatures and the requested shares."""

    def __init__(self, session: Session, registry: DeviceRegistry | None = None) -> None:
        self.session = session
        self.registry = registry
        self.cohort = set(session.x_of)
        self.graph: Graph = {}
        self.ads: dict[int, Advertisement] = {}
        self.misbehaving: dict[int, str] = {}  # device → why it was dropped
        self.tags: dict[tuple[int, int], tuple[bytes, bytes]] = {}  # (sender, receiver) → (tag_b, tag_s)
        self.complaints: dict[int, set[int]] = {}
        self.u2: set[int] = set()
        self.u3: set[int] = set()
        self.signatures: dict[int, bytes] = {}
        self.acc: np.ndarray | None = None
        self.requested: dict[int, set[str]] = {}  # owner → kinds of shares requested ("self", "key")
        self.bad_shares = 0

    def _drop(self, u: int, why: str) -> None:
        self.misbehaving.setdefault(u, why)

    def receive_advertisements(self, ads: list[Advertisement]) -> Graph:
        """Accept well-formed (and, malicious variant, validly signed) advertisements; fix the round's graph."""
        s, seen = self.session, set()
        for ad in ads:
            u = ad.device_id
            if u in seen:
                self._drop(u, "advertised twice")
            seen.add(u)
            if u not in self.cohort:
                continue
            if s.malicious and not (self.registry and self.registry.verify(u, ad.signature, ad.payload(s))):
                self._drop(u, "key advertisement without a valid signature")
            self.ads.setdefault(u, ad)
        for name in ("c_pk", "s_pk"):  # a key copied from another device: drop both
            owners: dict[bytes, list[int]] = {}
            for u, ad in self.ads.items():
                owners.setdefault(getattr(ad, name), []).append(u)
            for us in owners.values():
                for u in us if len(us) > 1 else ():
                    self._drop(u, f"advertised a {name} shared with another device")
        self.ads = {u: ad for u, ad in sorted(self.ads.items()) if u not in self.misbehaving}
        seed = graph_seed(s.session_id, s.round, {u: ad.graph_key for u, ad in self.ads.items()})
        self.graph = harary_graph(sorted(self.cohort), s.degree or len(self.cohort) - 1, seed)
        return self.graph

    def share_keys_request(self, u: int) -> tuple[dict[int, Advertisement], list[int]]:
        """ShareKeys request to u: every accepted advertisement (the graph's input) and u's live neighbours."""
        return dict(self.ads), sorted(self.graph[u] & set(self.ads))

    def route_shares(self, outboxes: Mapping[int, Mapping[int, EncryptedShare]]) -> dict[int, dict[int, EncryptedShare]]:
        """Fix the first U2 (before complaints) and forward each member the messages addressed to it by members."""
        s, sent = self.session, set()
        for u, box in outboxes.items():
            ok = all(
                m.sender == u and m.receiver == v and v in self.graph[u] and m.nonce == share_nonce(s, u, v)
                for v, m in box.items()
            )
            if not ok or u not in self.ads:
                self._drop(u, "malformed share messages")
            elif set(box) >= self.graph[u] & set(self.ads):
                sent.add(u)
            else:
                self._drop(u, "did not send a share to every live neighbour")
        self.u2 = key_sharing_survivors(self.graph, set(self.ads), sent, s.threshold)
        inboxes: dict[int, dict[int, EncryptedShare]] = {v: {} for v in self.u2}
        for u in self.u2:
            for v, m in outboxes[u].items():
                if v in self.u2:
                    inboxes[v][u] = m
                    self.tags[(u, v)] = (m.tag_b, m.tag_s)
        return inboxes

    def receive_complaints(self, complaints: Mapping[int, list[int]]) -> set[int]:
        """Senders whose share a receiver could not authenticate no longer count as held by that receiver; a
        device left with < t valid holders leaves U2 (before anyone masks with it)."""
        for v, bad in complaints.items():
            if v in self.u2 and bad:
                self.complaints[v] = set(bad)
        self.u2 = key_sharing_survivors(self.graph, self.u2, self.u2, self.session.threshold, self.complaints)
        return self.u2

    def mask_list(self, u: int) -> list[int]:
        """MaskedInputCollection request: the neighbours u must mask with (its neighbours in U2)."""
        return sorted(self.graph[u] & self.u2)

    def receive_masked(self, u: int, y: np.ndarray) -> bool:
        """Add a masked vector; a malformed one drops its sender (False), not the round."""
        if u not in self.u2 or u in self.u3:
            raise AggregationFailed(f"masked input from device {u}, which is not expected (again) this round")
        if self.acc is not None and (y.shape != self.acc.shape or y.dtype != self.session.dtype):
            self._drop(u, f"masked vector of shape {y.shape}/{y.dtype}, expected {self.acc.shape}")
            return False
        if self.acc is None:
            self.acc = np.zeros(y.shape, dtype=self.session.dtype)
        np.add(self.acc, y, out=self.acc)
        self.u3.add(u)
        return True

    def receive_signature(self, v: int, signature: bytes) -> bool:
        """Consistency check (malicious variant): v's signature on U3; a bad one makes v a non-responder."""
        ok = self.registry is not None and self.registry.verify(v, signature, survivors_payload(self.session, self.u3))
        if ok:
            self.signatures[v] = signature
        else:
            self._drop(v, "invalid signature on the survivor set")
        return ok

    def unmask_request(self, v: int) -> UnmaskRequest:
        """Survivors and dropped among v's neighbours, with U3 (and the neighbours' signatures on it)."""
        survivors = sorted(self.graph[v] & self.u3)
        dropped = sorted(self.graph[v] & (self.u2 - self.u3))
        for owner, kind in [(o, "self") for o in survivors] + [(o, "key") for o in dropped]:
            kinds = self.requested.setdefault(owner, set())
            kinds.add(kind)
            if len(kinds) > 1:
                raise AggregationFailed(f"server bug: both share kinds requested for device {owner}")
        sigs = {w: self.signatures[w] for w in survivors if w in self.signatures}
        return UnmaskRequest(tuple(survivors), tuple(dropped), tuple(sorted(self.u3)), sigs)

    def _check_response(self, v: int, r: UnmaskResponse) -> bool:
        """Every revealed share must match the tag its owner published for (owner, v); otherwise v lied."""
        s = self.session
        for kind, shares in ((b"b", r.self_mask_shares), (b"s", r.key_shares)):
            for owner, y in shares.items():
                tags = self.tags.get((owner, v))
                if tags is None or share_tag(s, owner, v, kind, y) != tags[0 if kind == b"b" else 1]:
                    return False
        return True

    def _reconstruct(self, responses: Mapping[int, UnmaskResponse], owner: int, kind: str) -> int:
        field_name = "self_mask_shares" if kind == "self" else "key_shares"
        shares = {self.session.x_of[v]: getattr(r, field_name)[owner] for v, r in responses.items()
                  if owner in getattr(r, field_name)}
        t = self.session.threshold
        if len(shares) < t:
            what = "self-mask seed" if kind == "self" else "mask key"
            raise AggregationFailed(
                f"cannot recover the {what} of device {owner}: {len(shares)} valid shares, threshold {t} "
                f"({self.bad_shares} shares failed authentication, {len(self.misbehaving)} devices misbehaved)"
            )
        return shamir.reconstruct(shares, t)

    def finish(self, responses: Mapping[int, UnmaskResponse], stream: MaskStream | None = None) -> np.ndarray:
        """Remove survivors' self-masks and dropped devices' pairwise masks; return Σ x_u mod 2^b over U3."""
        s = self.session
        if self.acc is None:
            raise AggregationFailed("no masked input was received this round")
        if stream is None or stream.length != self.acc.size:
            stream = MaskStream(self.acc.size, s.bits)
        self.bad_shares = sum(len(r.bad_senders) for r in responses.values())
        good = {}
        for v, r in responses.items():
            if self._check_response(v, r):
                good[v] = r
            else:
                self._drop(v, "revealed a share that does not match its public tag")
        acc = self.acc.copy()
        masks: list[tuple[bytes, int]] = []
        for u in sorted(self.u3):
            b = self._reconstruct(good, u, "self")
            seed = b.to_bytes(32, "big") if b < 1 << 256 else b""
            if commitment(seed, s, u) != self.ads[u].b_commit:
                raise AggregationFailed(
                    f"the reconstructed self-mask seed of device {u} does not match its commitment (its own shares "
                    "are inconsistent: a device that deals bad shares cannot be unmasked without verifiable sharing)"
                )
            masks.append((self_mask_key(seed, s, u), -1))
        for d in sorted(self.u2 - self.u3):
            if not self.graph[d] & self.u3:
                continue
            k = self._reconstruct(good, d, "key")
            ok = k < 1 << 256
            if ok:
                sk = X25519PrivateKey.from_private_bytes(k.to_bytes(32, "big"))
                ok = sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) == self.ads[d].s_pk
            if not ok:
                raise AggregationFailed(
                    f"the reconstructed mask key of device {d} does not match its advertised key (inconsistent shares)"
                )
            for v in sorted(self.graph[d] & self.u3):
                # v added pair_sign(v, d)·PRG(s_vd); take it back out.
                masks.append((pairwise_key(sk, self.ads[v].s_pk, s, d, v), -pair_sign(v, d)))
        stream.add_many(acc, masks)
        return s.reduce(acc)
