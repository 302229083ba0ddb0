"""The full protocol's message exchange in one process: simulated devices (`SecAggClient`) talk to `SecAggServer`.

Over Flower each of these calls is one Message-API round (`pflm/flower/secure.py`, the device half in the
ClientApp: `pflm/flower/secure_node.py`); here they are direct calls. A device that refuses a request (`ProtocolViolation`) leaves the round
and is recorded in `refusals`; the round goes on without it and fails safely below the threshold.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from pflm.aggregator.secagg import shamir
from pflm.aggregator.secagg.client import ProtocolViolation, SecAggClient
from pflm.aggregator.secagg.options import SecAggConfig
from pflm.aggregator.secagg.fixed_point import ChunkEncoder
from pflm.aggregator.secagg.masking import MaskStream, Session
from pflm.aggregator.secagg.messages import DeviceIdentity, DeviceRegistry, UnmaskResponse
from pflm.aggregator.secagg.protocol import SecAggServer
from pflm.errors import AggregationFailed


STAGES = ("advertise", "share", "masked_input", "unmask")


def dropout_plan(cfg: SecAggConfig, seed: int, round_: int, cohort: list[int]) -> dict[int, str]:
    """Simulated dropouts: device → the stage before which it drops (absent = never), seeded by (run seed, round)."""
    probs = [cfg.dropout_advertise, cfg.dropout_share, cfg.dropout_masked_input, cfg.dropout_unmask]
    if not any(probs):
        return {}
    digest = hashlib.sha256(f"pflm-secagg-dropout|{seed}|{round_}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:16], "big"))
    draws = rng.random((len(cohort), len(STAGES)))
    plan: dict[int, str] = {}
    for u, row in zip(cohort, draws):
        for stage, p, r in zip(STAGES, probs, row):
            if r < p:
                plan[u] = stage
                break
    return plan


def upload_bytes_estimate(degree: int, length: int, bits: int) -> int:
    """Bytes one device sends in the full protocol (keys, encrypted shares, masked vector, unmask answers)."""
    # ids, nonce, (sender, receiver) header, 2 shares, AEAD tag, 2 public share tags
    share_msg = 16 + 12 + 16 + 2 * shamir.SHARE_BYTES + 16 + 64
    return 104 + degree * share_msg + (length * bits + 7) // 8 + 8 + degree * (8 + shamir.SHARE_BYTES)


class InProcessProtocol:
    """One round of the full protocol between the cohort's simulated devices and the server."""

    def __init__(
        self,
        session: Session,
        config: SecAggConfig,
        plan: dict[int, str],
        registry: DeviceRegistry | None = None,
        identities: dict[int, DeviceIdentity] | None = None,
        transcript: dict[str, Any] | None = None,
    ) -> None:
        self.session, self.config, self.plan = session, config, plan
        self.registry, self.identities = registry, identities or {}
        self.transcript = transcript
        self.server = SecAggServer(session, registry)
        self.clients: dict[int, SecAggClient] = {}
        self.refusals: dict[int, str] = {}  # device → why it refused a server request (left the round)
        self.secs = {"advertise": 0.0, "share": 0.0, "unmask_clients": 0.0, "unmask_server": 0.0}

    def _call(self, u: int, fn: Callable[[], Any]) -> Any:
        """Run one device step; a refusal removes the device from the round (returns None)."""
        try:
            return fn()
        except ProtocolViolation as e:
            self.refusals[u] = str(e)
            return None

    def begin(self) -> set[int]:
        """AdvertiseKeys, ShareKeys (with complaints): returns U2."""
        s, t0 = self.session, time.perf_counter()
        advertising = [u for u in s.cohort if self.plan.get(u) != "advertise"]
        for u in advertising:
            client = self._call(u, lambda u=u: SecAggClient(u, s, self.config, self.identities.get(u), self.registry))
            if client is not None:
                self.clients[u] = client
        ads = [ad for u, c in self.clients.items() if (ad := self._call(u, c.advertise)) is not None]
        self.server.receive_advertisements(ads)
        t1 = time.perf_counter()
        outboxes = {}
        for u, client in self.clients.items():
            if self.plan.get(u) == "share" or u not in self.server.ads:
                continue
            peers, neighbours = self.server.share_keys_request(u)
            if len(neighbours) < s.threshold:
                continue  # the device cannot share its secrets safely: it leaves the round
            out = self._call(u, lambda c=client, p=peers, nb=neighbours: c.share_keys(p, nb))
            if out is not None:
                outboxes[u] = out
        inboxes = self.server.route_shares(outboxes)
        complaints = {}
        for v, inbox in inboxes.items():
            bad = self._call(v, lambda v=v, box=inbox: self.clients[v].receive_shares(box))
            if bad is None:
                bad = sorted(inbox)  # a refusing device holds no usable share
            complaints[v] = bad
        self.server.u2 -= set(self.refusals)  # devices that left hold nothing and mask with nobody
        self.server.receive_complaints(complaints)
        self.secs["advertise"], self.secs["share"] = t1 - t0, time.perf_counter() - t1
        if self.transcript is not None:
            self.transcript["ads"] = dict(self.server.ads)
            self.transcript["ciphertexts"] = {u: dict(o) for u, o in outboxes.items()}
        return set(self.server.u2)

    @property
    def graph(self) -> dict[int, frozenset[int]]:
        return self.server.graph

    def masked_input(self, u: int, encoder: np.ndarray | ChunkEncoder, stream: MaskStream) -> np.ndarray | None:
        """The device's masked vector (None if it refused the server's mask list)."""
        return self._call(u, lambda: self.clients[u].masked_input(encoder, self.server.mask_list(u), stream))

    def finalize(self, responders: set[int], stream: MaskStream) -> np.ndarray:
        """Consistency check (malicious variant), Unmasking, and the server's reconstruction."""
        t0 = time.perf_counter()
        srv = self.server
        if self.session.malicious:
            u3 = sorted(srv.u3)
            for v in sorted(responders):
                sig = self._call(v, lambda v=v: self.clients[v].sign_survivors(u3))
                if sig is None or not srv.receive_signature(v, sig):
                    responders = responders - {v}
        responses: dict[int, UnmaskResponse] = {}
        for v in sorted(responders):
            request = srv.unmask_request(v)
            resp = self._call(v, lambda v=v, r=request: self.clients[v].unmask(r))
            if resp is not None:
                responses[v] = resp
            if self.transcript is not None:
                self.transcript["requests"][v] = (list(request.survivors), list(request.dropped))
                if resp is not None:
                    self.transcript["responses"][v] = resp
        if self.refusals and not responses:
            raise AggregationFailed(f"every device refused to unmask: {next(iter(self.refusals.values()))}")
        t1 = time.perf_counter()
        total = srv.finish(responses, stream)
        self.secs["unmask_clients"], self.secs["unmask_server"] = t1 - t0, time.perf_counter() - t1
        return total
