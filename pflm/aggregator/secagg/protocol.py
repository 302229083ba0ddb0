"""Server side of the protocol: routes keys and shares, sums masked inputs, and unmasks only the cohort's sum.

Also holds the survivor bookkeeping shared by both modes (who advertised, who shared keys, who can still be
recovered), so `mode="simulate"` reaches exactly the same survivor sets and failures as the full protocol.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pflm.aggregator.secagg import shamir
from pflm.aggregator.secagg.client import Advertisement, UnmaskResponse, commitment
from pflm.aggregator.secagg.graph import prune_to_threshold
from pflm.aggregator.secagg.masking import MaskStream, Session, pair_sign, pairwise_key, self_mask_key
from pflm.errors import AggregationFailed

Graph = dict[int, frozenset[int]]


def key_sharing_survivors(graph: Graph, advertised: set[int], sent_shares: set[int], threshold: int) -> set[int]:
    """U2: devices that sent shares to ≥ threshold live neighbours, pruned until every member keeps that many."""
    return prune_to_threshold(graph, advertised & sent_shares, threshold)


def recovery_problem(graph: Graph, u2: set[int], u3: set[int], responders: set[int], threshold: int) -> str | None:
    """Why the sum cannot be unmasked with these responders (None if every needed secret has ≥ t holders)."""
    if len(u3) < threshold:
        return f"only {len(u3)} devices sent masked inputs, fewer than the threshold {threshold}"
    for u in sorted(u2):
        if u not in u3 and not graph[u] & u3:
            continue  # dropped, and no survivor masked with it: nothing to remove
        holders = len(graph[u] & responders)
        if holders < threshold:
            what = "self-mask seed" if u in u3 else "mask key (it dropped out)"
            return (
                f"cannot recover the {what} of device {u}: only {holders} of its neighbours answered the "
                f"unmasking request, threshold {threshold}"
            )
    return None


class SecAggServer:
    """The honest-but-curious server: sees public keys, ciphertexts, masked vectors and the requested shares."""

    def __init__(self, session: Session, graph: Graph) -> None:
        self.session = session
        self.graph = graph
        self.ads: dict[int, Advertisement] = {}
        self.u2: set[int] = set()
        self.u3: set[int] = set()
        self.acc: np.ndarray | None = None
        self.requested: dict[int, set[str]] = {}  # owner → kinds of shares requested ("self", "key")
        self.bad_shares = 0

    def receive_advertisements(self, ads: list[Advertisement]) -> None:
        for ad in ads:
            if ad.device_id not in self.graph or ad.device_id in self.ads:
                raise AggregationFailed(f"unexpected or repeated key advertisement from device {ad.device_id}")
            self.ads[ad.device_id] = ad

    def peers_of(self, u: int) -> dict[int, Advertisement]:
        """ShareKeys request: the advertisements of u's graph neighbours that advertised."""
        return {v: self.ads[v] for v in sorted(self.graph[u]) if v in self.ads}

    def route_shares(self, outboxes: Mapping[int, Mapping[int, bytes]]) -> dict[int, dict[int, bytes]]:
        """Fix U2 and forward each member the ciphertexts addressed to it by other members."""
        self.u2 = key_sharing_survivors(self.graph, set(self.ads), set(outboxes), self.session.threshold)
        inboxes: dict[int, dict[int, bytes]] = {v: {} for v in self.u2}
        for u in self.u2:
            for v, ct in outboxes[u].items():
                if v in self.u2:
                    inboxes[v][u] = ct
        return inboxes

    def mask_list(self, u: int) -> list[int]:
        """MaskedInputCollection request: the neighbours u must mask with (its neighbours in U2)."""
        return sorted(self.graph[u] & self.u2)

    def receive_masked(self, u: int, y: np.ndarray) -> None:
        if u not in self.u2 or u in self.u3:
            raise AggregationFailed(f"masked input from device {u}, which is not expected (again) this round")
        if self.acc is None:
            self.acc = np.zeros(y.shape, dtype=self.session.dtype)
        if y.shape != self.acc.shape or y.dtype != self.session.dtype:
            raise AggregationFailed(f"device {u} sent a masked vector of shape {y.shape}, expected {self.acc.shape}")
        np.add(self.acc, y, out=self.acc)
        self.u3.add(u)

    def unmask_request(self, v: int) -> tuple[list[int], list[int]]:
        """(survivors, dropped) among v's neighbours; records the request so no owner is asked for both kinds."""
        survivors = sorted(self.graph[v] & self.u3)
        dropped = sorted(self.graph[v] & (self.u2 - self.u3))
        for owner, kind in [(o, "self") for o in survivors] + [(o, "key") for o in dropped]:
            kinds = self.requested.setdefault(owner, set())
            kinds.add(kind)
            if len(kinds) > 1:
                raise AggregationFailed(f"server bug: both share kinds requested for device {owner}")
        return survivors, dropped

    def _collect(self, responses: Mapping[int, UnmaskResponse], owner: int, kind: str) -> dict[int, int]:
        x_of = self.session.x_of
        field_name = "self_mask_shares" if kind == "self" else "key_shares"
        return {x_of[v]: getattr(r, field_name)[owner] for v, r in responses.items() if owner in getattr(r, field_name)}

    def _reconstruct(self, responses: Mapping[int, UnmaskResponse], owner: int, kind: str) -> int:
        shares = self._collect(responses, owner, kind)
        t = self.session.threshold
        if len(shares) < t:
            what = "self-mask seed" if kind == "self" else "mask key"
            raise AggregationFailed(
                f"cannot recover the {what} of device {owner}: {len(shares)} valid shares, threshold {t} "
                f"({self.bad_shares} shares failed authentication this round)"
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
        acc = self.acc.copy()
        masks: list[tuple[bytes, int]] = []
        for u in sorted(self.u3):
            b = self._reconstruct(responses, u, "self")
            if b >= 1 << 256:
                raise AggregationFailed(
                    f"the reconstructed self-mask seed of device {u} is invalid (a share is corrupt)"
                )
            seed = b.to_bytes(32, "big")
            if commitment(seed, s, u) != self.ads[u].b_commit:
                raise AggregationFailed(
                    f"the reconstructed self-mask seed of device {u} does not match its commitment (a share is corrupt)"
                )
            masks.append((self_mask_key(seed, s, u), -1))
        for d in sorted(self.u2 - self.u3):
            if not self.graph[d] & self.u3:
                continue
            k = self._reconstruct(responses, d, "key")
            if k >= 1 << 256:
                raise AggregationFailed(f"the reconstructed mask key of device {d} is invalid (a share is corrupt)")
            sk = X25519PrivateKey.from_private_bytes(k.to_bytes(32, "big"))
            if sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) != self.ads[d].s_pk:
                raise AggregationFailed(
                    f"the reconstructed mask key of device {d} does not match its advertised key (a share is corrupt)"
                )
            for v in sorted(self.graph[d] & self.u3):
                # v added pair_sign(v, d)·PRG(s_vd); take it back out.
                masks.append((pairwise_key(sk, self.ads[v].s_pk, s, d, v), -pair_sign(v, d)))
        stream.add_many(acc, masks)
        return s.reduce(acc)
