"""`RemoteSecureAggregator`: only the server half of the protocol, for devices that run `SecAggClient` elsewhere.

The devices (e.g. Flower SuperNodes) run the device half; a transport (`pflm.flower.secure`) carries each protocol
round as one message exchange and feeds what comes back into the methods below, which are `SecAggServer`'s with
the bookkeeping of `SecureAggregator` (survivor sets, failure reasons, metrics, decoding). The server never holds a
device's secret: it sees advertisements, ciphertexts, complaints, masked vectors, signatures and the shares
needed to unmask the sum.

Pseudonyms. The protocol runs on per-round pseudonyms 0..n−1 (a fresh secret permutation of the cohort), not on
user ids: every device learns the session (the pseudonyms and their keys, which the protocol needs), but not
which users were sampled. Devices learn the realised cohort size n (inherent to secure aggregation: the
threshold checks need it).

Codec. The layout is fixed before any device encodes: the device aux keys (`aux_keys`, from the recipe's
device postprocessors) and the side values `SIDE_KEYS` (train loss × tokens, tokens), which travel inside the
secure sum so per-device losses never reach the server. `finalize` returns the sum without the side values;
`side_sums` holds their totals.
"""

from __future__ import annotations

import math
import secrets
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pflm.aggregator.base import AggregateResult, RoundContext, Upload
from pflm.aggregator.secagg.aggregator import SecureAggregator
from pflm.aggregator.secagg.fixed_point import FixedPointCodec
from pflm.aggregator.secagg.masking import MaskStream
from pflm.aggregator.secagg.messages import (
    Advertisement,
    DeviceRegistry,
    EncryptedShare,
    UnmaskRequest,
    UnmaskResponse,
)
from pflm.aggregator.secagg.protocol import SecAggServer, recovery_problem
from pflm.errors import AggregationFailed, NoContributions

SIDE_LOSS = "side.loss_sum"  # Σ train loss × tokens
SIDE_TOKENS = "side.tokens"  # Σ tokens
SIDE_KEYS = (SIDE_LOSS, SIDE_TOKENS)
MAX_TOKEN_LOSS = 64.0  # a device clamps its mean per-token loss to this (nats) before encoding it


class RemoteSecureAggregator(SecureAggregator):
    """`SecureAggregator` whose devices are remote: begin() only fixes the session, the stages are driven by a
    transport, finalize() decodes the unmasked sum. `upload`/`receive`/`add` are not available (devices mask
    on their own machines)."""

    name = "secure-remote"

    def __init__(self, config=None, seed=None, run_key=None, aux_keys: tuple[str, ...] = (),
                 token_bound: float = 1e6) -> None:
        super().__init__(config, seed, run_key)
        if self.config.mode != "full":
            raise ValueError("RemoteSecureAggregator runs the full protocol (mode=full)")
        self.device_aux_keys = tuple(aux_keys)
        self.token_bound = float(token_bound)
        self.enrolled: dict[int, bytes] = {}  # user → long-term Ed25519 public key (malicious variant; first use)

    # ---------------------------------------------------------------- session
    def begin(self, ctx: RoundContext) -> None:
        users = sorted(set(int(u) for u in ctx.cohort))
        if len(users) != len(ctx.cohort):
            raise AggregationFailed(f"round {ctx.round}: the cohort lists a device twice")
        perm = list(range(len(users)))
        secrets.SystemRandom().shuffle(perm)
        self.pseudonym = {u: p for u, p in zip(users, perm)}
        self.user_of = {p: u for u, p in self.pseudonym.items()}
        self.real_ctx = ctx
        self.refusals: dict[int, str] = {}  # devices that refused a request (ProtocolViolation)
        self.left: dict[int, str] = {}  # every device that left the round (refused, or its node failed)
        self.bytes_from: dict[int, int] = {}
        self.side_sums: dict[str, float] = {}
        self.nonfinite = 0
        self._result: AggregateResult | None = None
        self._decoded_failure: str | None = None
        pctx = RoundContext(ctx.round, ctx.dim, sorted(perm), ctx.clip_bound, ctx.seed, dict(ctx.extra))
        self.registry = DeviceRegistry()  # this round's pseudonym → long-term key (malicious variant)
        super().begin(pctx)
        self.plan = {}  # simulated dropouts do not apply: real nodes drop by themselves
        if self._failure is None:
            self.codec = self.make_codec()

    def _begin_full(self) -> None:
        self.server = SecAggServer(self.session, self.registry)
        self.protocol = None
        self.u2 = set(self.cohort)  # provisional, until key sharing
        self.graph = {}

    @property
    def failure(self) -> str | None:
        return self._failure

    def make_codec(self) -> FixedPointCodec:
        cfg, ctx = self.config, self.ctx
        assert ctx is not None
        keys = self.device_aux_keys + SIDE_KEYS
        bounds = (cfg.aux_bound,) * len(self.device_aux_keys) + (self.token_bound * MAX_TOKEN_LOSS, self.token_bound)
        if self.codec_factory is not None:  # distributed DP: rotation, rounding, noise share (privacy/distributed)
            return self.codec_factory(ctx, len(self.cohort), keys, 1, aux_bounds=bounds)
        return FixedPointCodec(cfg.bits, len(self.cohort), ctx.dim, ctx.clip_bound * cfg.value_factor, cfg.max_weight,
                               keys, cfg.aux_bound, 1, bounds)

    def codec_params(self) -> dict[str, Any]:
        """What the devices are told to encode with (public): the fixed-point layout, or the distributed-DP
        codec's public mechanism parameters (`kind: distributed`), which the devices check against their own
        policy before adding their noise share (pflm.flower.secure_node)."""
        c = self.codec
        assert c is not None
        if hasattr(c, "public_params"):
            return c.public_params()
        return {"kind": "fixed", "bits": c.bits, "n": c.cohort_size, "dim": c.dim, "value_bound": c.value_bound,
                "weight_bound": c.weight_bound, "aux_keys": list(c.aux_keys), "aux_bound": c.aux_bound,
                "aux_bounds": list(c.aux_bound_list)}

    def _count(self, u: int, nbytes: int) -> None:
        self.bytes_from[u] = self.bytes_from.get(u, 0) + int(nbytes)

    def refuse(self, u: int, why: str, protocol: bool = True) -> None:
        """Device u left the round: it refused a request (`protocol`), or its node failed. It sends nothing more."""
        self.left.setdefault(u, why)
        if protocol:
            self.refusals.setdefault(u, why)

    # ---------------------------------------------------------------- stages
    def register_keys(self, keys: dict[int, bytes]) -> None:
        """Malicious variant: the devices' long-term keys for this round's registry, pinned to the user at first
        use (trust on first use: the ServerApp distributes the registry, see docs/secagg.md)."""
        for pid, pk in keys.items():
            user = self.user_of.get(pid)
            if user is None:
                continue
            if self.enrolled.setdefault(user, pk) != pk:
                self.server._drop(pid, "a long-term key that differs from the one its user enrolled with")
                continue
            try:
                self.registry.register(pid, pk)
            except ValueError as e:
                self.server._drop(pid, f"an unusable long-term key ({e})")

    def receive_advertisements(self, ads: list[Advertisement]) -> dict[int, Advertisement]:
        for ad in ads:
            self._count(ad.device_id, ad.nbytes)
        self.server.receive_advertisements(ads)
        return dict(self.server.ads)

    def share_request(self, u: int) -> list[int] | None:
        """u's live neighbours, or None when u cannot share its secrets safely (fewer than t of them)."""
        _, neighbours = self.server.share_keys_request(u)
        return neighbours if len(neighbours) >= self.threshold else None

    def route_shares(self, outboxes: dict[int, dict[int, EncryptedShare]]) -> dict[int, dict[int, EncryptedShare]]:
        for u, box in outboxes.items():
            self._count(u, sum(m.nbytes for m in box.values()))
        return self.server.route_shares(outboxes)

    def receive_complaints(self, complaints: dict[int, list[int]], inboxes: dict[int, dict]) -> set[int]:
        """Complaints of the devices that answered; devices that left hold no usable share (all complained)."""
        full = {v: (sorted(inboxes[v]) if v in self.left else list(complaints.get(v, sorted(inboxes[v]))))
                for v in inboxes}
        self.server.u2 -= set(self.left)
        self.server.receive_complaints(full)
        self.u2 = set(self.server.u2)
        self.graph = self.server.graph
        self.graph_seed = None
        if len(self.u2) < self.threshold and self._failure is None:
            self._failure = (f"only {len(self.u2)} of {len(self.cohort)} devices completed key sharing, fewer "
                             f"than the threshold {self.threshold}")
        return set(self.u2)

    def mask_list(self, u: int) -> list[int]:
        return self.server.mask_list(u)

    def receive_masked(self, u: int, y: np.ndarray, wire_bytes: int | None = None) -> bool:
        """One device's masked vector (wrong length or type: the device is dropped, not the round); `wire_bytes`:
        its size as sent when the transport packed it (distributed DP sends D·m bits)."""
        if u not in self.u2 or u in self._contributed or u in self.left:
            return False
        if y.shape != (self.codec.length,) or y.dtype != self.session.dtype:
            self.server._drop(u, f"masked vector of shape {y.shape}/{y.dtype}")
            self._excluded["malformed"] += 1
            return False
        if not self.server.receive_masked(u, y):
            self._excluded["malformed"] += 1
            return False
        self._count(u, y.nbytes if wire_bytes is None else int(wire_bytes))
        self._contributed.add(u)
        self._seen.add(u)
        return True

    def responders(self) -> set[int]:
        return {v for v in self._contributed if v not in self.left}

    def u3(self) -> list[int]:
        return sorted(self.server.u3)

    def receive_signature(self, v: int, sig: bytes) -> bool:
        self._count(v, len(sig))
        return self.server.receive_signature(v, sig)

    def unmask_request(self, v: int) -> UnmaskRequest:
        return self.server.unmask_request(v)

    def recovery_problem(self, responders: set[int]) -> str | None:
        return recovery_problem(self.graph, self.u2, set(self._contributed), responders, self.threshold,
                                self.server.complaints)

    def finish(self, responses: dict[int, UnmaskResponse]) -> None:
        """Unmask and decode; the result (or the reason it failed) is kept for `finalize`."""
        if self.nobody_contributed:  # an empty sum: finalize raises NoContributions
            return
        try:
            if self._failure is not None:
                raise AggregationFailed(self._failure)
            for v, r in responses.items():
                self._count(v, r.nbytes)
            if self.left and not responses:
                raise AggregationFailed(f"no device answered the unmasking request: {next(iter(self.left.values()))}")
            problem = self.recovery_problem(set(responses))
            if problem:
                raise AggregationFailed(problem)
            t0 = time.perf_counter()
            total = self.server.finish(responses, MaskStream(self.codec.length, self.config.bits, self.workers))
            self._secs["unmask_server"] += time.perf_counter() - t0
        except AggregationFailed as e:
            self._decoded_failure = f"secure aggregation of round {self.ctx.round} failed safely: {e}"
            return
        self.last_sum = total
        dec = self.codec.decode(total)
        self.side_sums = {k: dec.aux.pop(k) for k in SIDE_KEYS}
        n = len(self._contributed)
        self.clients = {u: SimpleNamespace(device_id=u, bytes_sent=b) for u, b in self.bytes_from.items()}
        m = self._metrics(dec.clamped, n, self.server.bad_shares, dec.update)
        self.clients = {}
        m["secagg_refusals"] = float(len(self.refusals))
        m["secagg_excluded_nonfinite"] = float(self.nonfinite)
        self._result = AggregateResult(torch.from_numpy(dec.update.astype(np.float32)), dec.weight, n, dec.aux, m)

    def side_tally(self) -> tuple[float, int]:
        """(Σ loss × tokens, Σ tokens) of the contributors, from the secure sum (0, 0 if the round failed)."""
        if not self.side_sums:
            return 0.0, 0
        tokens = self.side_sums[SIDE_TOKENS]
        return float(self.side_sums[SIDE_LOSS]), int(round(tokens)) if math.isfinite(tokens) else 0

    # ---------------------------------------------------------------- the Aggregator interface
    def upload(self, device_id, update, weight, aux=None) -> Upload:
        raise AggregationFailed("RemoteSecureAggregator: devices encode and mask on their own machines")

    def receive(self, upload: Upload) -> None:
        raise AggregationFailed("RemoteSecureAggregator: masked vectors arrive through receive_masked")

    def drop(self, device_id: int) -> None:
        """A user (real id) that will not contribute."""
        p = self.pseudonym.get(int(device_id))
        if p is not None and p not in self._contributed:
            self._dropped.add(p)

    def finalize(self) -> AggregateResult:
        if self.ctx is None:
            raise AggregationFailed("RemoteSecureAggregator.finalize called before begin()")
        if self.nobody_contributed:
            raise NoContributions("no device contributed an update this round")
        if self._failure is not None and self._decoded_failure is None:
            raise AggregationFailed(f"secure aggregation of round {self.ctx.round} failed safely: {self._failure}")
        if self._decoded_failure is not None:
            raise AggregationFailed(self._decoded_failure)
        if self._result is None:
            raise AggregationFailed(f"secure aggregation of round {self.ctx.round}: the protocol did not complete")
        return self._result
