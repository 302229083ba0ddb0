"""Device side of the secure-aggregation protocol: the code path a real client runs in each of the four rounds."""

from __future__ import annotations

import hashlib
import secrets
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pflm.aggregator.secagg import shamir
from pflm.aggregator.secagg.fixed_point import ChunkEncoder
from pflm.aggregator.secagg.masking import (
    AEAD_NONCE,
    MaskStream,
    Session,
    channel_key,
    pair_sign,
    pairwise_key,
    self_mask_key,
)
from pflm.errors import AggregationFailed

_SHARE_PLAINTEXT = struct.Struct(">qq")


class ProtocolViolation(AggregationFailed):
    """An honest device refuses a request that would break the protocol's guarantees."""


def commitment(seed: bytes, session: Session, device_id: int) -> bytes:
    """Public hash commitment to a device's self-mask seed (lets the server check a reconstruction)."""
    return hashlib.sha256(b"pflm-secagg-commit" + session.binding(device_id) + seed).digest()


def _public(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


@dataclass(frozen=True)
class Advertisement:
    """Round 0 (AdvertiseKeys): two X25519 public keys and the self-mask commitment."""

    device_id: int
    c_pk: bytes  # share-encryption key
    s_pk: bytes  # mask-agreement key
    b_commit: bytes

    @property
    def nbytes(self) -> int:
        return 8 + len(self.c_pk) + len(self.s_pk) + len(self.b_commit)


@dataclass
class UnmaskResponse:
    """Round 3 (Unmasking): self-mask shares of survivors, mask-key shares of dropped devices."""

    device_id: int
    self_mask_shares: dict[int, int] = field(default_factory=dict)  # owner → share y
    key_shares: dict[int, int] = field(default_factory=dict)
    bad_senders: list[int] = field(default_factory=list)  # shares that failed authentication

    @property
    def nbytes(self) -> int:
        return 8 + (8 + shamir.SHARE_BYTES) * (len(self.self_mask_shares) + len(self.key_shares))


class SecAggClient:
    """One device's protocol state for one round (its secrets never leave this object except as shares)."""

    def __init__(self, device_id: int, session: Session) -> None:
        self.device_id = device_id
        self.session = session
        self._c_sk = X25519PrivateKey.generate()
        self._s_sk = X25519PrivateKey.generate()
        self._b_seed = secrets.token_bytes(32)
        self._peers: dict[int, Advertisement] = {}
        self._inbox: dict[int, bytes] = {}
        self._revealed: dict[int, str] = {}  # owner → "self" | "key": never both for one owner
        self.bytes_sent = 0

    def advertise(self) -> Advertisement:
        ad = Advertisement(
            self.device_id,
            _public(self._c_sk),
            _public(self._s_sk),
            commitment(self._b_seed, self.session, self.device_id),
        )
        self.bytes_sent += ad.nbytes
        return ad

    def share_keys(self, peers: Mapping[int, Advertisement]) -> dict[int, bytes]:
        """Round 1 (ShareKeys): t-of-k shares of the self-mask seed and mask key, one AEAD message per neighbour."""
        s = self.session
        if self.device_id in peers:
            raise ProtocolViolation(f"device {self.device_id}: the server listed the device as its own neighbour")
        if len(peers) < s.threshold:
            raise AggregationFailed(
                f"device {self.device_id}: only {len(peers)} neighbours advertised keys, threshold is {s.threshold}"
            )
        if len({ad.s_pk for ad in peers.values()}) != len(peers):
            raise ProtocolViolation(f"device {self.device_id}: two neighbours advertised the same mask key")
        self._peers = dict(peers)
        xs = [s.x_of[v] for v in sorted(peers)]
        b_shares = shamir.split(int.from_bytes(self._b_seed, "big"), xs, s.threshold)
        k_shares = shamir.split(int.from_bytes(self._s_sk.private_bytes_raw(), "big"), xs, s.threshold)
        out: dict[int, bytes] = {}
        for v in sorted(peers):
            x = s.x_of[v]
            plain = (
                _SHARE_PLAINTEXT.pack(self.device_id, v) + shamir.to_bytes(b_shares[x]) + shamir.to_bytes(k_shares[x])
            )
            key = channel_key(self._c_sk, peers[v].c_pk, s, self.device_id, v)
            out[v] = ChaCha20Poly1305(key).encrypt(AEAD_NONCE, plain, s.binding(self.device_id, v))
            self.bytes_sent += 16 + len(out[v])
        return out

    def receive_shares(self, inbox: Mapping[int, bytes]) -> None:
        """Keep the ciphertexts addressed to this device (decrypted only when the server asks to unmask)."""
        unknown = set(inbox) - set(self._peers)
        if unknown:
            raise ProtocolViolation(f"device {self.device_id}: shares from non-neighbours {sorted(unknown)}")
        self._inbox = dict(inbox)

    def masked_input(
        self,
        encoded: np.ndarray | ChunkEncoder,
        mask_with: Sequence[int],
        stream: MaskStream | None = None,
    ) -> np.ndarray:
        """Round 2 (MaskedInputCollection): y = x + PRG(b_u) + Σ_v ±PRG(s_uv) mod 2^b.

        `encoded` is the fixed-point vector x (left unchanged), or a `ChunkEncoder` that produces x
        chunk by chunk inside the masking pass (same integers, one pass over memory).
        """
        s = self.session
        fused = isinstance(encoded, ChunkEncoder)
        length = encoded.codec.length if fused else encoded.size
        if not fused and (encoded.ndim != 1 or encoded.dtype != s.dtype):
            raise AggregationFailed(
                f"device {self.device_id}: encoded input must be a flat {np.dtype(s.dtype)} vector, "
                f"got {encoded.shape}/{encoded.dtype}"
            )
        strangers = [v for v in mask_with if v not in self._inbox or v == self.device_id]
        if strangers:
            raise ProtocolViolation(
                f"device {self.device_id}: asked to mask with {strangers}, who shared no keys with it"
            )
        if stream is None or stream.length != length:
            stream = MaskStream(length, s.bits)
        masks = [(self_mask_key(self._b_seed, s, self.device_id), +1)]
        for v in mask_with:
            key = pairwise_key(self._s_sk, self._peers[v].s_pk, s, self.device_id, v)
            masks.append((key, pair_sign(self.device_id, v)))
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

    def unmask(self, survivors: Sequence[int], dropped: Sequence[int]) -> UnmaskResponse:
        """Round 3: reveal b-shares of survivors and key shares of dropped devices — never both for one device."""
        sset, dset = set(survivors), set(dropped)
        if sset & dset:
            raise ProtocolViolation(
                f"device {self.device_id}: devices {sorted(sset & dset)} are listed as both survivors and dropped"
            )
        resp = UnmaskResponse(self.device_id)
        for owner in sorted(sset | dset):
            kind = "self" if owner in sset else "key"
            if self._revealed.get(owner, kind) != kind:
                raise ProtocolViolation(
                    f"device {self.device_id}: refusing to reveal both share kinds of device {owner}"
                )
            if owner not in self._inbox:
                raise ProtocolViolation(f"device {self.device_id}: holds no share of device {owner}")
            ad = self._peers[owner]
            key = channel_key(self._c_sk, ad.c_pk, self.session, owner, self.device_id)
            try:
                plain = ChaCha20Poly1305(key).decrypt(
                    AEAD_NONCE, self._inbox[owner], self.session.binding(owner, self.device_id)
                )
                sender, receiver = _SHARE_PLAINTEXT.unpack_from(plain)
                if (sender, receiver) != (ad.device_id, self.device_id) or len(plain) != 16 + 2 * shamir.SHARE_BYTES:
                    raise ValueError("share addressed to someone else")
                b_share = shamir.from_bytes(plain[16 : 16 + shamir.SHARE_BYTES])
                k_share = shamir.from_bytes(plain[16 + shamir.SHARE_BYTES :])
            except (InvalidTag, ValueError, struct.error):
                resp.bad_senders.append(owner)
                continue
            self._revealed[owner] = kind
            if kind == "self":
                resp.self_mask_shares[owner] = b_share
            else:
                resp.key_shares[owner] = k_share
        self.bytes_sent += resp.nbytes
        return resp
