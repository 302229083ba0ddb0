"""Wire messages of the protocol and the device key registry: what a Flower ClientApp would (de)serialise per round.

Every message is a plain frozen dataclass of ints and bytes. Signed payloads, AEAD nonces and share tags are
derived here, so device and server compute them identically.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from pflm.aggregator.secagg import shamir
from pflm.aggregator.secagg.masking import Session


def commitment(seed: bytes, session: Session, device_id: int) -> bytes:
    """Public hash commitment to a device's self-mask seed (lets the server check a reconstruction)."""
    return hashlib.sha256(b"pflm-secagg-commit" + session.binding(device_id) + seed).digest()


def share_nonce(session: Session, sender: int, receiver: int, purpose: bytes = b"share") -> bytes:
    """The 12-byte AEAD nonce of the one message (session, sender → receiver, purpose): unique by construction."""
    return hashlib.sha256(b"pflm-secagg-nonce" + purpose + session.binding(sender, receiver)).digest()[:12]


def share_tag(session: Session, sender: int, receiver: int, kind: bytes, share: int) -> bytes:
    """Public hash of one Shamir share (hiding: a share of t ≥ 2 is a uniform 521-bit field element).

    The sender publishes it with the ciphertext (it is also the AEAD's associated data, so the server cannot
    alter it); the server checks a revealed share against it, so a device that reveals a wrong share is caught
    and dropped instead of spoiling the reconstruction.
    """
    return hashlib.sha256(b"pflm-secagg-share-tag" + kind + session.binding(sender, receiver) + shamir.to_bytes(share)).digest()


def survivors_payload(session: Session, u3: Iterable[int]) -> bytes:
    """What a survivor signs in the consistency-check round: the session and the survivor set U3 it was told."""
    ids = sorted(set(u3))
    return b"pflm-secagg-u3" + session.binding(len(ids)) + b"".join(struct.pack(">q", u) for u in ids)


@dataclass(frozen=True)
class Advertisement:
    """Round 0 (AdvertiseKeys): two X25519 public keys, the self-mask commitment and (malicious variant) an
    Ed25519 signature under the device's registered long-term key."""

    device_id: int
    c_pk: bytes  # share-encryption key
    s_pk: bytes  # mask-agreement key
    b_commit: bytes
    signature: bytes = b""

    def payload(self, session: Session) -> bytes:
        return b"pflm-secagg-ad" + session.binding(self.device_id) + self.c_pk + self.s_pk + self.b_commit

    @property
    def graph_key(self) -> bytes:
        """What the round's public graph seed hashes for this device."""
        return self.c_pk + self.s_pk + self.b_commit

    @property
    def nbytes(self) -> int:
        return 8 + len(self.c_pk) + len(self.s_pk) + len(self.b_commit) + len(self.signature)


@dataclass(frozen=True)
class EncryptedShare:
    """Round 1 (ShareKeys): one neighbour's b- and s_sk-shares under ChaCha20-Poly1305, with public share tags."""

    sender: int
    receiver: int
    nonce: bytes
    ciphertext: bytes
    tag_b: bytes
    tag_s: bytes

    def associated_data(self, session: Session) -> bytes:
        return session.binding(self.sender, self.receiver) + self.tag_b + self.tag_s

    @property
    def nbytes(self) -> int:
        return 16 + len(self.nonce) + len(self.ciphertext) + len(self.tag_b) + len(self.tag_s)


@dataclass(frozen=True)
class UnmaskRequest:
    """Round 4 (Unmasking) request to one survivor v: which neighbours survived / dropped, and (malicious
    variant) the survivor set U3 with the neighbours' consistency-check signatures on it."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    u3: tuple[int, ...] | None = None
    signatures: Mapping[int, bytes] = field(default_factory=dict)


@dataclass
class UnmaskResponse:
    """Round 4 (Unmasking): self-mask shares of survivors, mask-key shares of dropped devices."""

    device_id: int
    self_mask_shares: dict[int, int] = field(default_factory=dict)  # owner → share y
    key_shares: dict[int, int] = field(default_factory=dict)
    bad_senders: list[int] = field(default_factory=list)  # shares that failed authentication

    @property
    def nbytes(self) -> int:
        return 8 + (8 + shamir.SHARE_BYTES) * (len(self.self_mask_shares) + len(self.key_shares))


def public_bytes(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


class DeviceIdentity:
    """A device's long-term Ed25519 signing key (made at enrolment; never leaves the device)."""

    def __init__(self, device_id: int, key: Ed25519PrivateKey | None = None) -> None:
        self.device_id = int(device_id)
        self._key = key or Ed25519PrivateKey.generate()

    @property
    def public_key(self) -> bytes:
        return public_bytes(self._key.public_key())

    def sign(self, payload: bytes) -> bytes:
        return self._key.sign(payload)


class DeviceRegistry:
    """Device id → long-term Ed25519 public key: the PKI of the malicious-server variant.

    Built at enrolment (in simulation: when the aggregator first meets a device) and handed to every device;
    the protocol trusts it as Bonawitz et al. trust their PKI — a registry the server could rewrite would let it
    impersonate devices, so in a deployment it must come from outside the server (e.g. device attestation).
    """

    def __init__(self, keys: Mapping[int, bytes] | None = None) -> None:
        self._keys: dict[int, bytes] = {}
        for u, pk in (keys or {}).items():
            self.register(u, pk)

    def register(self, device_id: int, public_key: bytes) -> None:
        u = int(device_id)
        if u in self._keys and self._keys[u] != public_key:
            raise ValueError(f"device {u} is already enrolled with a different key")
        Ed25519PublicKey.from_public_bytes(public_key)  # must parse
        self._keys[u] = public_key

    def enrol(self, device_id: int) -> DeviceIdentity:
        """Make a new identity for a device and register its public key (simulation's enrolment step)."""
        ident = DeviceIdentity(device_id)
        self.register(device_id, ident.public_key)
        return ident

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._keys

    def public_keys(self) -> frozenset[bytes]:
        return frozenset(self._keys.values())

    def verify(self, device_id: int, signature: bytes, payload: bytes) -> bool:
        pk = self._keys.get(int(device_id))
        if pk is None or len(signature) != 64:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(pk).verify(signature, payload)
        except InvalidSignature:
            return False
        return True
