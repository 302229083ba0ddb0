"""Device side of the protocol: one round's state machine that checks every server request against trusted parameters.

This is the unit a Flower ClientApp runs (one method per Message-API round); the in-process simulator runs the same
code. Nothing the server sends is trusted: the degree and threshold floors come from the device's own
`SecAggConfig`, the neighbour graph is recomputed from the advertised keys, and each request is refused
(`ProtocolViolation`, after which the device sends nothing more) when it could break the guarantees.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pflm.aggregator.secagg import shamir
from pflm.aggregator.secagg.options import SecAggConfig
from pflm.aggregator.secagg.fixed_point import ChunkEncoder
from pflm.aggregator.secagg.graph import graph_seed, harary_graph
from pflm.aggregator.secagg.masking import MaskStream, Session, channel_key, pair_sign, pairwise_key, self_mask_key
from pflm.aggregator.secagg.messages import (  # noqa: F401  (re-exported: the old import path of these names)
    Advertisement,
    DeviceIdentity,
    DeviceRegistry,
    EncryptedShare,
    UnmaskRequest,
    UnmaskResponse,
    commitment,
    share_nonce,
    share_tag,
    survivors_payload,
)
from pflm.aggregator.secagg.params import minimum_threshold
from pflm.errors import AggregationFailed

_SHARE_PLAINTEXT = struct.Struct(">qq")
_STAGES = ("setup", "advertised", "shared", "received", "masked", "signed", "unmasked")


class ProtocolViolation(AggregationFailed):
    """An honest device refuses a request that would break the protocol's guarantees (it sends nothing more)."""


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


class SecAggClient:
    """One device's protocol state for one round (its secrets never leave this object except as shares).

    `config` holds the device's trusted parameters (floors on degree and threshold, bits, malicious variant);
    `identity` / `registry` (malicious variant) are its long-term signing key and the device key registry it
    received at enrolment. The constructor validates the round's public parameters (`session`).
    """

    def __init__(
        self,
        device_id: int,
        session: Session,
        config: SecAggConfig | None = None,
        identity: DeviceIdentity | None = None,
        registry: DeviceRegistry | None = None,
    ) -> None:
        self.device_id = int(device_id)
        self.session = session
        self.config = config or SecAggConfig(bits=session.bits)
        self.identity, self.registry = identity, registry
        self._stage = "setup"
        self._failed: str | None = None
        self.bytes_sent = 0
        self._check_setup()
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._b_seed = secrets.token_bytes(32)
        self._ad: Advertisement | None = None
        self._peers: dict[int, Advertisement] = {}  # live neighbours (advertised, in the recomputed graph)
        self._shares: dict[int, tuple[int, int]] = {}  # sender → (b-share, s_sk-share) held for it
        self._bad: set[int] = set()  # senders whose share failed authentication (reported to the server)
        self._mask_with: frozenset[int] = frozenset()
        self._u3: frozenset[int] | None = None

    # ------------------------------------------------------------------------------------------ checks
    def _refuse(self, why: str) -> None:
        self._failed = why
        raise ProtocolViolation(f"device {self.device_id} refuses: {why}")

    def _enter(self, expected: str, new: str) -> None:
        if self._failed is not None:
            raise ProtocolViolation(f"device {self.device_id} has left the round: {self._failed}")
        if self._stage != expected:
            self._refuse(f"request out of order ({new} after {self._stage}; each step runs once, in order)")
        self._stage = new

    def _check_setup(self) -> None:
        s, cfg = self.session, self.config
        n = len(s.x_of)
        if s.x_of != {u: i + 1 for i, u in enumerate(sorted(s.x_of))} or self.device_id not in s.x_of:
            self._refuse("the cohort's Shamir x-coordinates are not the canonical 1..n (or it is not in the cohort)")
        if n < 3:
            self._refuse(f"a cohort of {n} devices reveals its members' inputs")
        if s.bits != cfg.bits:
            self._refuse(f"the round uses {s.bits}-bit arithmetic, the device's config {cfg.bits}")
        if cfg.malicious and not s.malicious:
            self._refuse("the device requires the malicious-server variant (signatures and consistency check)")
        if s.malicious and (self.identity is None or self.registry is None):
            self._refuse("the malicious-server variant needs the device's enrolled identity and key registry")
        k = s.degree or n - 1
        k_min, _ = cfg.device_floor(n)
        if not k_min <= k <= n - 1:
            self._refuse(f"graph degree {k} is below the device's floor {k_min} for a cohort of {n}")
        t_min = max(2, cfg.threshold_for(k, n), minimum_threshold(k, s.malicious or cfg.malicious))
        if not t_min <= s.threshold <= k:
            self._refuse(f"threshold {s.threshold} is outside [{t_min}, {k}] (the device's floor for degree {k})")

    # ------------------------------------------------------------------------------------------ rounds
    def advertise(self) -> Advertisement:
        """Round 0 (AdvertiseKeys)."""
        self._enter("setup", "advertised")
        ad = Advertisement(self.device_id, _public(self._c_sk), _public(self._s_sk),
                           commitment(self._b_seed, self.session, self.device_id))
        if self.session.malicious:
            assert self.identity is not None
            ad = Advertisement(ad.device_id, ad.c_pk, ad.s_pk, ad.b_commit, self.identity.sign(ad.payload(self.session)))
        self._ad = ad
        self.bytes_sent += ad.nbytes
        return ad

    def neighbours_from(self, ads: Mapping[int, Advertisement]) -> list[int]:
        """This device's live neighbours, recomputed from the round's advertised keys (the public graph)."""
        s = self.session
        seed = graph_seed(s.session_id, s.round, {u: ad.graph_key for u, ad in ads.items()})
        graph = harary_graph(s.cohort, s.degree or len(s.x_of) - 1, seed)
        return sorted(graph[self.device_id] & set(ads))

    def share_keys(
        self, ads: Mapping[int, Advertisement], neighbours: Sequence[int] | None = None
    ) -> dict[int, EncryptedShare]:
        """Round 1 (ShareKeys): `ads` = every advertisement the server accepted this round (the graph's input),
        `neighbours` = the server's list of this device's neighbours (checked against the recomputed graph)."""
        self._enter("advertised", "shared")
        s = self.session
        if ads.get(self.device_id) != self._ad:
            self._refuse("its own key advertisement is missing or altered")
        for u, ad in ads.items():
            if ad.device_id != u or u not in s.x_of:
                self._refuse(f"advertisement {u} is not from a cohort member")
            if s.malicious and not self.registry.verify(u, ad.signature, ad.payload(s)):  # type: ignore[union-attr]
                self._refuse(f"the key advertisement of device {u} has no valid signature under the registry")
        for name in ("c_pk", "s_pk"):
            if len({getattr(ad, name) for ad in ads.values()}) != len(ads):
                self._refuse(f"two devices advertised the same {name}")
        mine = self.neighbours_from(ads)
        if neighbours is not None and sorted(set(neighbours)) != mine:
            self._refuse(f"the neighbour list {sorted(set(neighbours))} is not its graph neighbourhood {mine}")
        if len(mine) < s.threshold:
            self._refuse(f"only {len(mine)} neighbours advertised keys, threshold {s.threshold}")
        self._peers = {v: ads[v] for v in mine}
        xs = [s.x_of[v] for v in mine]
        b_shares = shamir.split(int.from_bytes(self._b_seed, "big"), xs, s.threshold)
        k_shares = shamir.split(int.from_bytes(self._s_sk.private_bytes_raw(), "big"), xs, s.threshold)
        out: dict[int, EncryptedShare] = {}
        for v in mine:
            b, k = b_shares[s.x_of[v]], k_shares[s.x_of[v]]
            msg = EncryptedShare(self.device_id, v, share_nonce(s, self.device_id, v), b"",
                                 share_tag(s, self.device_id, v, b"b", b), share_tag(s, self.device_id, v, b"s", k))
            plain = _SHARE_PLAINTEXT.pack(self.device_id, v) + shamir.to_bytes(b) + shamir.to_bytes(k)
            key = channel_key(self._c_sk, self._peers[v].c_pk, s, self.device_id, v)
            ct = ChaCha20Poly1305(key).encrypt(msg.nonce, plain, msg.associated_data(s))
            out[v] = EncryptedShare(msg.sender, v, msg.nonce, ct, msg.tag_b, msg.tag_s)
            self.bytes_sent += out[v].nbytes
        return out

    def receive_shares(self, inbox: Mapping[int, EncryptedShare]) -> list[int]:
        """Decrypt and check the shares addressed to this device; returns the senders whose message failed
        authentication (the device's complaints: the server counts them as not holding a share)."""
        self._enter("shared", "received")
        s, seen_nonces, seen_ct = self.session, set(), set()
        for v, msg in sorted(inbox.items()):
            if v not in self._peers or msg.sender != v or msg.receiver != self.device_id:
                self._refuse(f"a share message from {v} that is not from one of its neighbours to it")
            if msg.nonce in seen_nonces or msg.ciphertext in seen_ct:
                self._refuse(f"a repeated nonce or ciphertext (message from {v})")
            seen_nonces.add(msg.nonce)
            seen_ct.add(msg.ciphertext)
            if msg.nonce != share_nonce(s, v, self.device_id):
                self._refuse(f"the message from {v} does not use its unique (session, sender, receiver) nonce")
            try:
                key = channel_key(self._c_sk, self._peers[v].c_pk, s, v, self.device_id)
                plain = ChaCha20Poly1305(key).decrypt(msg.nonce, msg.ciphertext, msg.associated_data(s))
                if len(plain) != 16 + 2 * shamir.SHARE_BYTES or _SHARE_PLAINTEXT.unpack_from(plain) != (v, self.device_id):
                    raise ValueError("share addressed to someone else")
                b = shamir.from_bytes(plain[16 : 16 + shamir.SHARE_BYTES])
                k = shamir.from_bytes(plain[16 + shamir.SHARE_BYTES :])
                if (share_tag(s, v, self.device_id, b"b", b), share_tag(s, v, self.device_id, b"s", k)) != (
                    msg.tag_b, msg.tag_s
                ):
                    raise ValueError("share does not match its public tag")
            except (InvalidTag, ValueError, struct.error):
                self._bad.add(v)
                continue
            self._shares[v] = (b, k)
        return sorted(self._bad)

    def masked_input(
        self,
        encoded: np.ndarray | ChunkEncoder,
        mask_with: Sequence[int],
        stream: MaskStream | None = None,
    ) -> np.ndarray:
        """Round 2 (MaskedInputCollection): y = x + PRG(b_u) + Σ_v ±PRG(s_uv) mod 2^b over `mask_with`, which must
        be ≥ t neighbours that sent this device shares. `encoded` is the fixed-point vector x (left unchanged), or
        a `ChunkEncoder` that produces x chunk by chunk inside the masking pass (same integers, one pass)."""
        self._enter("received", "masked")
        s = self.session
        mask_set = set(mask_with)
        if len(mask_set) != len(mask_with):
            self._refuse("the mask list repeats a device")
        strangers = sorted(v for v in mask_set if v not in self._shares and v not in self._bad)
        if strangers:
            self._refuse(f"asked to mask with {strangers}, who shared no keys with it")
        if len(mask_set) < s.threshold:
            self._refuse(f"asked to mask with {len(mask_set)} neighbours, fewer than the threshold {s.threshold}")
        self._mask_with = frozenset(mask_set)
        fused = isinstance(encoded, ChunkEncoder)
        length = encoded.codec.length if fused else encoded.size
        if not fused and (encoded.ndim != 1 or encoded.dtype != s.dtype):
            raise AggregationFailed(
                f"device {self.device_id}: encoded input must be a flat {np.dtype(s.dtype)} vector, "
                f"got {encoded.shape}/{encoded.dtype}"
            )
        if stream is None or stream.length != length:
            stream = MaskStream(length, s.bits)
        masks = [(self_mask_key(self._b_seed, s, self.device_id), +1)]
        for v in sorted(mask_set):
            masks.append((pairwise_key(self._s_sk, self._peers[v].s_pk, s, self.device_id, v), pair_sign(self.device_id, v)))
        if fused:
            y = np.empty(length, dtype=s.dtype)
            stream.add_many(y, masks, source=encoded.filler)
            encoded.finish(y)  # the clamp count goes into its (already masked) slot: masks are additive
        else:
            y = encoded.copy()
            stream.add_many(y, masks)
        s.reduce(y)
        self.bytes_sent += (length * s.bits + 7) // 8
        return y

    def _check_survivor_set(self, u3: set[int]) -> None:
        if self.device_id not in u3 or not u3 <= set(self.session.x_of):
            self._refuse("the survivor set omits this device (which sent its masked input) or names strangers")
        seen = u3 & set(self._peers)
        if not seen <= self._mask_with:
            self._refuse(f"survivors {sorted(seen - self._mask_with)} were not in its mask list")
        if len(seen) < self.session.threshold:
            self._refuse(f"only {len(seen)} of its neighbours survived, fewer than the threshold {self.session.threshold}")

    def sign_survivors(self, u3: Sequence[int]) -> bytes:
        """Consistency-check round (malicious variant): sign the survivor set U3 the server announced — once."""
        self._enter("masked", "signed")
        if not self.session.malicious:
            self._refuse("the consistency-check round belongs to the malicious-server variant only")
        self._check_survivor_set(set(u3))
        self._u3 = frozenset(u3)
        assert self.identity is not None
        sig = self.identity.sign(survivors_payload(self.session, self._u3))
        self.bytes_sent += len(sig)
        return sig

    def unmask(self, survivors: Sequence[int] | UnmaskRequest, dropped: Sequence[int] = (),
               u3: Sequence[int] | None = None, signatures: Mapping[int, bytes] | None = None) -> UnmaskResponse:
        """Round 4 (Unmasking), answered once: b-shares of surviving neighbours, s_sk-shares of dropped ones.

        Refused unless survivors and dropped split exactly its mask list, ≥ t neighbours survived, and (malicious
        variant) U3 is the set it signed and ≥ t of its surviving neighbours signed that same set.
        """
        if isinstance(survivors, UnmaskRequest):
            survivors, dropped, u3, signatures = survivors.survivors, survivors.dropped, survivors.u3, survivors.signatures
        s = self.session
        sset, dset = set(survivors), set(dropped)
        if self._stage == "unmasked":
            self._refuse("a second unmasking request (it answers once: a second could ask for the other share kind)")
        self._enter("signed" if s.malicious else "masked", "unmasked")
        if sset & dset:
            self._refuse(f"devices {sorted(sset & dset)} are listed as both survivors and dropped")
        if sset | dset != self._mask_with:
            self._refuse(f"survivors ∪ dropped {sorted(sset | dset)} is not the mask list {sorted(self._mask_with)}")
        if len(sset) < s.threshold:
            self._refuse(f"only {len(sset)} surviving neighbours, fewer than the threshold {s.threshold}")
        if s.malicious and u3 is None:
            self._refuse("no signed survivor set (consistency check) came with the request")
        if u3 is not None:
            u3set = set(u3)
            if s.malicious and frozenset(u3set) != self._u3:
                self._refuse("the survivor set differs from the one it signed")
            self._check_survivor_set(u3set)
            if sset != u3set & self._mask_with or dset != self._mask_with - u3set:
                self._refuse("survivors / dropped do not match the announced survivor set")
            if s.malicious:
                payload = survivors_payload(s, u3set)
                ok = [v for v, sig in (signatures or {}).items()
                      if v in sset and self.registry.verify(v, sig, payload)]  # type: ignore[union-attr]
                if len(ok) < s.threshold:
                    self._refuse(f"only {len(ok)} valid neighbour signatures on the survivor set, threshold {s.threshold}")
        resp = UnmaskResponse(self.device_id)
        for owner in sorted(sset | dset):
            if owner not in self._shares:
                resp.bad_senders.append(owner)
                continue
            b, k = self._shares[owner]
            if owner in sset:
                resp.self_mask_shares[owner] = b
            else:
                resp.key_shares[owner] = k
        self.bytes_sent += resp.nbytes
        return resp
