"""Byte forms of the protocol's messages and of one device's between-rounds state (for a remote device half).

A deployed Flower SuperNode runs each protocol round in a fresh process, so a device's `SecAggClient` is written
to bytes after every round and read back before the next (`client_state` / `restore_client`). Those bytes hold
the device's secrets (X25519 private keys, self-mask seed, the shares it holds): they stay on the device (Flower's
per-node `context.state`), never on the wire. Messages (`pack` / `unpack` of dicts built with the `*_to` /
`*_from` pairs) carry only what the server may see. JSON with base64 for bytes and decimal strings for the
521-bit Shamir shares: plain data, no pickle.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pflm.aggregator.secagg.client import SecAggClient
from pflm.aggregator.secagg.options import SecAggConfig
from pflm.aggregator.secagg.masking import Session
from pflm.aggregator.secagg.messages import (
    Advertisement,
    DeviceIdentity,
    DeviceRegistry,
    EncryptedShare,
    UnmaskRequest,
    UnmaskResponse,
)

STATE_VERSION = 1


def b64(x: bytes) -> str:
    return base64.b64encode(bytes(x)).decode("ascii")


def unb64(s: str) -> bytes:
    return base64.b64decode(s.encode("ascii"), validate=True)


def pack(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def unpack(blob: bytes) -> dict:
    obj = json.loads(bytes(blob).decode())
    if not isinstance(obj, dict):
        raise ValueError("a secagg message must be a JSON object")
    return obj


def int_keys(d: dict) -> dict[int, Any]:
    return {int(k): v for k, v in d.items()}


# ---------------------------------------------------------------------------------------------- public messages
def session_to(s: Session) -> dict:
    return {"id": b64(s.session_id), "round": s.round, "bits": s.bits, "t": s.threshold, "ids": sorted(s.x_of),
            "degree": s.degree, "malicious": bool(s.malicious)}


def session_from(d: dict) -> Session:
    ids = [int(u) for u in d["ids"]]
    return Session(unb64(d["id"]), int(d["round"]), int(d["bits"]), int(d["t"]),
                   {u: i + 1 for i, u in enumerate(sorted(ids))}, int(d["degree"]), bool(d["malicious"]))


def ad_to(a: Advertisement) -> dict:
    return {"u": a.device_id, "c": b64(a.c_pk), "s": b64(a.s_pk), "b": b64(a.b_commit), "sig": b64(a.signature)}


def ad_from(d: dict) -> Advertisement:
    return Advertisement(int(d["u"]), unb64(d["c"]), unb64(d["s"]), unb64(d["b"]), unb64(d.get("sig", "")))


def share_to(m: EncryptedShare) -> dict:
    return {"from": m.sender, "to": m.receiver, "n": b64(m.nonce), "ct": b64(m.ciphertext), "tb": b64(m.tag_b),
            "ts": b64(m.tag_s)}


def share_from(d: dict) -> EncryptedShare:
    return EncryptedShare(int(d["from"]), int(d["to"]), unb64(d["n"]), unb64(d["ct"]), unb64(d["tb"]), unb64(d["ts"]))


def request_to(r: UnmaskRequest) -> dict:
    return {"survivors": list(r.survivors), "dropped": list(r.dropped),
            "u3": None if r.u3 is None else list(r.u3), "sigs": {str(k): b64(v) for k, v in r.signatures.items()}}


def request_from(d: dict) -> UnmaskRequest:
    u3 = d.get("u3")
    return UnmaskRequest(tuple(int(u) for u in d["survivors"]), tuple(int(u) for u in d["dropped"]),
                         None if u3 is None else tuple(int(u) for u in u3),
                         {int(k): unb64(v) for k, v in d.get("sigs", {}).items()})


def response_to(r: UnmaskResponse) -> dict:
    return {"u": r.device_id, "b": {str(k): str(v) for k, v in r.self_mask_shares.items()},
            "k": {str(k): str(v) for k, v in r.key_shares.items()}, "bad": list(r.bad_senders)}


def response_from(d: dict) -> UnmaskResponse:
    return UnmaskResponse(int(d["u"]), {int(k): int(v) for k, v in d["b"].items()},
                          {int(k): int(v) for k, v in d["k"].items()}, [int(u) for u in d.get("bad", [])])


def registry_to(r: DeviceRegistry) -> dict:
    return {str(u): b64(pk) for u, pk in r._keys.items()}  # noqa: SLF001 - the registry's own content


def registry_from(d: dict) -> DeviceRegistry:
    return DeviceRegistry({int(u): unb64(pk) for u, pk in d.items()})


# ---------------------------------------------------------------------------------------------- device state
def client_state(c: SecAggClient) -> bytes:
    """Everything a device needs to answer the next protocol round (SECRET: keep it on the device)."""
    d = {
        "v": STATE_VERSION,
        "device": c.device_id,
        "session": session_to(c.session),
        "config": dataclasses.asdict(c.config),
        "stage": c._stage,
        "failed": c._failed,
        "bytes_sent": c.bytes_sent,
        "c_sk": b64(c._c_sk.private_bytes_raw()),
        "s_sk": b64(c._s_sk.private_bytes_raw()),
        "b_seed": b64(c._b_seed),
        "ad": None if c._ad is None else ad_to(c._ad),
        "peers": {str(v): ad_to(a) for v, a in c._peers.items()},
        "shares": {str(v): [str(b), str(k)] for v, (b, k) in c._shares.items()},
        "bad": sorted(c._bad),
        "mask_with": sorted(c._mask_with),
        "u3": None if c._u3 is None else sorted(c._u3),
        "registry": None if c.registry is None else registry_to(c.registry),
    }
    return pack(d)


def restore_client(blob: bytes, identity: DeviceIdentity | None = None) -> SecAggClient:
    """The `SecAggClient` written by `client_state` (its long-term identity, if any, is kept apart by the caller)."""
    d = unpack(blob)
    if d.get("v") != STATE_VERSION:
        raise ValueError(f"unknown secagg device state version {d.get('v')!r}")
    c = SecAggClient.__new__(SecAggClient)
    c.device_id = int(d["device"])
    c.session = session_from(d["session"])
    c.config = SecAggConfig(**d["config"])
    c.identity = identity
    c.registry = None if d["registry"] is None else registry_from(d["registry"])
    c._stage, c._failed, c.bytes_sent = str(d["stage"]), d["failed"], int(d["bytes_sent"])
    c._c_sk = X25519PrivateKey.from_private_bytes(unb64(d["c_sk"]))
    c._s_sk = X25519PrivateKey.from_private_bytes(unb64(d["s_sk"]))
    c._b_seed = unb64(d["b_seed"])
    c._ad = None if d["ad"] is None else ad_from(d["ad"])
    c._peers = {int(v): ad_from(a) for v, a in d["peers"].items()}
    c._shares = {int(v): (int(b), int(k)) for v, (b, k) in d["shares"].items()}
    c._bad = {int(v) for v in d["bad"]}
    c._mask_with = frozenset(int(v) for v in d["mask_with"])
    c._u3 = None if d["u3"] is None else frozenset(int(v) for v in d["u3"])
    return c
