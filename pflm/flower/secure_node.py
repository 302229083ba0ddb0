"""The device half of secure aggregation on a Flower SuperNode: one handler per protocol round.

Each handler reads the round's request (`secagg` ConfigRecord: one JSON blob, `pflm.aggregator.secagg.wire`),
restores the node's devices (`SecAggClient`, one per cohort user of this node, under a per-round pseudonym) from
`context.state`, runs the client method, writes the devices back to `context.state` and replies with what the
server may see. `context.state` is Flower's per-node RecordDict: it stays on the node (a deployed SuperNode hands it
to each fresh `flwr-clientapp` process and keeps what it returns), so the devices' X25519 private keys,
self-mask seeds and received shares never cross the wire. A device that refuses a request (`ProtocolViolation`)
is reported in `refused` and sends nothing more; its state is kept (marked failed) so it keeps refusing.

The `train` stage trains the node's users (the same `device_update` as the plain path), shrinks each clipped
update by the codec's rounding slack (`shrink_factor`), encodes it in fixed point with a device-side rounding key and
masks it — or, with distributed DP, first checks the server's mechanism parameters against the node's policy
(`pflm.flower.ddp_node`), then rotates, scales, rounds, adds the device's own noise share (keyed by the same
device key: fresh OS randomness unless the node allows reproducible runs), masks mod 2^w and sends the low m bits
packed. The reply holds only masked vectors and the pseudonyms of devices whose update was NaN/Inf or that
refused. Train loss and token counts go into the masked vector as side values (`remote.SIDE_KEYS`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

from pflm.aggregator.secagg import wire
from pflm.aggregator.secagg.client import ProtocolViolation, SecAggClient
from pflm.aggregator.secagg.options import SecAggConfig
from pflm.aggregator.secagg.fixed_point import FixedPointCodec, rounding_key
from pflm.aggregator.secagg.masking import MaskStream
from pflm.aggregator.secagg.messages import DeviceIdentity, DeviceRegistry
from pflm.errors import AggregationFailed, PflmError
from pflm.flower import ddp_node
from pflm.flower.policy import node_policy
from pflm.flower.shards import owner

SECAGG = "secagg"  # the ConfigRecord holding a stage's JSON blob (requests and replies)
MASKED = "masked"  # the ArrayRecord of masked vectors (train stage reply)
STATE = "pflm.secagg"  # context.state ConfigRecord: the node's devices for the current session
IDENTITIES = "pflm.secagg.identities"  # context.state ConfigRecord: user → long-term Ed25519 key (malicious variant)
STAGES = ("advertise", "share", "receive", "train", "sign", "unmask")


def blob_record(obj: dict) -> ConfigRecord:
    return ConfigRecord({"blob": wire.pack(obj)})


def read_blob(content: RecordDict) -> dict:
    return wire.unpack(content.config_records[SECAGG]["blob"])


def reply(msg: Message, obj: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({SECAGG: blob_record(obj)})
    if arrays is not None:
        content[MASKED] = arrays
    return Message(content, reply_to=msg)


# ------------------------------------------------------------------------------------------ node state
class NodeDevices:
    """The node's devices of the current session, as stored in `context.state` (device secrets stay here)."""

    def __init__(self, context: Context) -> None:
        self.context = context
        rec = context.state.config_records.get(STATE) if STATE in context.state else None
        self.session_id: bytes = bytes(rec["session-id"]) if rec is not None else b""
        self.user_of: dict[int, int] = {}
        self.blobs: dict[int, bytes] = {}
        if rec is not None:
            for k, v in rec.items():
                if k.startswith("user."):
                    self.user_of[int(k[5:])] = int(v)
                elif k.startswith("dev."):
                    self.blobs[int(k[4:])] = bytes(v)

    def check_session(self, sid: str) -> None:
        if not self.session_id or wire.unb64(sid) != self.session_id:
            raise PflmError("this node holds no devices of the requested secure-aggregation session")

    def client(self, pid: int) -> SecAggClient:
        if pid not in self.blobs:
            raise ProtocolViolation(f"device {pid} is not a device of this node in this session")
        c = wire.restore_client(self.blobs[pid])
        if c.session.malicious:
            c.identity = self.identity(pid)
        return c

    def identity(self, pid: int) -> DeviceIdentity:
        """The long-term signing key of the user behind pseudonym `pid` (enrolled on this node at first use; kept
        in context.state across rounds, never sent)."""
        return DeviceIdentity(pid, self._signing_key(self.user_of[pid]))

    def enrol(self, user: int) -> bytes:
        """The long-term public key of `user` on this node (made now if new): what the node hands the PKI."""
        return DeviceIdentity(0, self._signing_key(user)).public_key

    def _signing_key(self, user: int):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        rec = self.context.state.config_records.get(IDENTITIES) if IDENTITIES in self.context.state else None
        if rec is None:
            rec = ConfigRecord()
        if str(user) not in rec:
            rec[str(user)] = Ed25519PrivateKey.generate().private_bytes_raw()
            self.context.state[IDENTITIES] = rec
        return Ed25519PrivateKey.from_private_bytes(bytes(rec[str(user)]))

    def put(self, c: SecAggClient) -> None:
        self.blobs[c.device_id] = wire.client_state(c)

    def save(self) -> None:
        rec = ConfigRecord({"session-id": self.session_id})
        for pid, u in self.user_of.items():
            rec[f"user.{pid}"] = u
        for pid, b in self.blobs.items():
            rec[f"dev.{pid}"] = b
        self.context.state[STATE] = rec

    def clear(self) -> None:
        if STATE in self.context.state:
            del self.context.state[STATE]


def _each(devs: NodeDevices, pids, fn) -> tuple[dict, dict[str, str]]:
    """Run fn(client) for each pseudonym; refusals are collected, the client's new state kept."""
    out, refused = {}, {}
    for pid in sorted(int(p) for p in pids):
        try:
            c = devs.client(pid)
        except ProtocolViolation as e:
            refused[str(pid)] = str(e)
            continue
        try:
            out[pid] = fn(pid, c)
        except ProtocolViolation as e:
            refused[str(pid)] = str(e)
        devs.put(c)
    devs.save()
    return out, refused


# ------------------------------------------------------------------------------------------ stages
def advertise(msg: Message, context: Context, partition: tuple[int, int] | None) -> Message:
    req = read_blob(msg.content)
    session = wire.session_from(req["session"])
    # the server's options, with every value that protects the users replaced by the node's own policy
    config = node_policy(context.node_config).session_config(SecAggConfig(**req["config"]))
    devices = [(int(u), int(p)) for u, p in req["devices"]]
    if partition is not None:
        pid_, n = partition
        foreign = [u for u, _ in devices if owner(u, n) != pid_]
        if foreign:
            raise PflmError(f"users {foreign[:5]} do not belong to partition {pid_} of {n}")
    devs = NodeDevices(context)
    devs.clear()  # a new session: the previous round's devices (and their secrets) are gone
    devs = NodeDevices(context)
    devs.session_id = session.session_id
    ads, refused, keys = {}, {}, {}
    for u, pid in devices:
        devs.user_of[pid] = u
        identity = registry = None
        if session.malicious or config.malicious:  # the registry arrives with the share request
            identity = devs.identity(pid)
            keys[str(pid)] = wire.b64(identity.public_key)
            registry = DeviceRegistry({pid: identity.public_key})
        try:
            c = SecAggClient(pid, session, config, identity, registry)
        except ProtocolViolation as e:
            refused[str(pid)] = str(e)
            continue
        ads[pid] = wire.ad_to(c.advertise())
        devs.put(c)
    devs.save()
    return reply(msg, {"ads": list(ads.values()), "refused": refused, "keys": keys})


def share(msg: Message, context: Context) -> Message:
    req = read_blob(msg.content)
    devs = NodeDevices(context)
    devs.check_session(req["session-id"])
    ads = {int(d["u"]): wire.ad_from(d) for d in req["ads"]}
    nbs = {int(p): [int(v) for v in nb] for p, nb in req["neighbours"].items()}
    registry = wire.registry_from(req["registry"]) if req.get("registry") is not None else None
    trusted = node_policy(context.node_config).trusted_key_set()

    def share_keys(pid: int, c: SecAggClient):
        if c.session.malicious:
            if registry is None or not registry.verify(pid, c.identity.sign(b"pflm-own-key"), b"pflm-own-key"):
                c._refuse("the round's key registry does not hold its own long-term key")
            if trusted is not None and not registry.public_keys() <= trusted:
                c._refuse("the round's key registry holds a key outside this node's trusted registry (a device the "
                          "PKI does not know: the server may be impersonating one)")
            c.registry = registry
        return c.share_keys(ads, nbs[pid])

    out, refused = _each(devs, nbs, share_keys)
    return reply(msg, {"outboxes": {str(p): [wire.share_to(m) for m in box.values()] for p, box in out.items()},
                       "refused": refused})


def receive(msg: Message, context: Context) -> Message:
    req = read_blob(msg.content)
    devs = NodeDevices(context)
    devs.check_session(req["session-id"])
    inboxes = {int(p): {int(m["from"]): wire.share_from(m) for m in box} for p, box in req["inboxes"].items()}
    out, refused = _each(devs, inboxes, lambda pid, c: c.receive_shares(inboxes[pid]))
    return reply(msg, {"complaints": {str(p): bad for p, bad in out.items()}, "refused": refused})


def device_rounding_key(reproducible: bool, config: SecAggConfig, seed: int, round_idx: int, user: int) -> bytes:
    """The device's secret stochastic-rounding key: fresh from the OS CSPRNG; with `rounding=seeded` (only if the
    node's policy says so) the public SHA-256(seed, round, user); in a reproducible run the node's policy allows,
    the in-process simulator's seed-derived key."""
    from pflm.secure_random import derive_key, new_key, subkey

    if config.rounding == "seeded":
        return rounding_key(seed, round_idx, user)
    if reproducible:
        return subkey(subkey(derive_key(seed), "secagg-rounding"), "upload", round_idx, user)
    return new_key()


def train(msg: Message, context: Context, partition: tuple[int, int] | None, threads: int | None,
          data_dir: str | None, worker: str | None = None) -> Message:
    from pflm.aggregator.secagg.remote import MAX_TOKEN_LOSS, SIDE_LOSS, SIDE_TOKENS
    from pflm.device.spec import DeviceSpec
    from pflm.flower import codec
    from pflm.flower.tasks import check_partition, node_updates

    req = read_blob(msg.content)
    devs = NodeDevices(context)
    devs.check_session(req["session-id"])
    payload = codec.train_payload(msg.content)  # torch-free (with a warm worker this process never loads torch)
    devices = [(int(u), int(p)) for u, p in req["devices"]]
    if any(devs.user_of.get(p) != u for u, p in devices) or [u for u, _ in devices] != payload.users:
        raise PflmError("the train request pairs users and pseudonyms differently from the advertise request")
    check_partition(payload.users, partition)
    cp = req["codec"]
    policy = node_policy(context.node_config)
    reproducible = policy.check_reproducible(DeviceSpec.from_json(str(payload.config["spec"])).reproducible)
    rnd, seed, clip_bound = int(payload.config["round"]), int(payload.config["seed"]), float(payload.config["clip-bound"])
    updates = node_updates(payload, policy, data_dir, worker)
    masked, nonfinite, refused = {}, [], {}
    stream = enc_codec = None
    bounds = dict(zip(cp.get("aux_keys", []), cp.get("aux_bounds", [])))
    token_bound = float(bounds.get(SIDE_TOKENS, 0.0))
    for (u, pid), (trained, rep) in zip(devices, updates):
        assert trained == u
        try:
            c = devs.client(pid)
        except ProtocolViolation as e:
            refused[str(pid)] = str(e)
            continue
        try:
            s = c.session
            if cp["bits"] != s.bits or cp["n"] != len(s.x_of) or cp["dim"] != int(payload.config["dim"]):
                raise ProtocolViolation(f"device {pid} refuses: the codec does not match the session "
                                        "(bits, cohort size, dimension)")
            why = ddp_node.refusal(cp, policy.distributed, s, c.config, clip_bound, int(payload.config["dim"]))
            if why is not None:  # checked before the device's update is touched
                c._refuse(why)
            if enc_codec is None:
                if cp.get("kind") == "distributed":  # rotation → γ → rounding → own noise share, mod 2^w
                    enc_codec = ddp_node.device_codec(cp, seed, rnd)
                else:
                    enc_codec = FixedPointCodec(int(cp["bits"]), int(cp["n"]), int(cp["dim"]), float(cp["value_bound"]),
                                                float(cp["weight_bound"]), tuple(cp["aux_keys"]), float(cp["aux_bound"]),
                                                max(1, threads or 1), tuple(float(b) for b in cp["aux_bounds"]))
                stream = MaskStream(enc_codec.length, s.bits, max(1, threads or 1))
            if rep is None:
                nonfinite.append(pid)
                c._failed = "its update is not finite"  # the device leaves the round
                continue
            aux = rep.aux
            unknown = sorted(set(aux) - set(enc_codec.aux_keys))
            if unknown:
                raise PflmError(f"the device produced side values {unknown} outside the round's layout "
                                f"{list(enc_codec.aux_keys)}: list every aux name in aggregation.secagg.aux_keys")
            tokens = min(float(rep.num_tokens), token_bound)
            loss = min(max(float(rep.train_loss), 0.0), MAX_TOKEN_LOSS)
            aux = {**aux, SIDE_LOSS: loss * tokens if np.isfinite(loss) else 0.0, SIDE_TOKENS: tokens}
            x = codec.numpy_of(rep.update).reshape(-1)
            shrink = enc_codec.shrink_factor(x, clip_bound * max(float(rep.weight), 0.0))
            rkey = device_rounding_key(reproducible, c.config, seed, rnd, u)  # noise and rounding: this key only
            if getattr(enc_codec, "fused", True):
                enc = enc_codec.encoder(x, float(rep.weight), aux, rkey, shrink)
                finite = None
            else:
                enc = enc_codec.encode(x, float(rep.weight), aux, rkey, shrink)
                finite = enc.finite
            if finite is False:
                nonfinite.append(pid)
                c._failed = "its update is not finite"
                continue
            y = c.masked_input(enc if finite is None else enc.ints, req["mask_lists"][str(pid)], stream)
            if not enc.finite:
                nonfinite.append(pid)
                c._failed = "its update is not finite"
                continue
            if cp.get("kind") == "distributed":  # only the low m bits of the rotated part travel (D·m bits)
                y = ddp_node.pack_masked(y, enc_codec.rotated, enc_codec.scale.modulus_bits)
            masked[str(pid)] = Array(np.ascontiguousarray(y))
        except ProtocolViolation as e:
            refused[str(pid)] = str(e)
        except (ValueError, AggregationFailed) as e:  # e.g. an update above the clip bound: this device leaves
            c._failed = str(e)
            refused[str(pid)] = f"device {pid} could not encode its update: {e}"
        finally:
            devs.put(c)
    devs.save()
    return reply(msg, {"nonfinite": nonfinite, "refused": refused}, ArrayRecord(array_dict=masked))


def sign(msg: Message, context: Context) -> Message:
    req = read_blob(msg.content)
    devs = NodeDevices(context)
    devs.check_session(req["session-id"])
    u3 = [int(u) for u in req["u3"]]
    out, refused = _each(devs, req["devices"], lambda pid, c: c.sign_survivors(u3))
    return reply(msg, {"sigs": {str(p): wire.b64(s) for p, s in out.items()}, "refused": refused})


def unmask(msg: Message, context: Context) -> Message:
    req = read_blob(msg.content)
    devs = NodeDevices(context)
    devs.check_session(req["session-id"])
    reqs = {int(p): wire.request_from(r) for p, r in req["requests"].items()}
    out, refused = _each(devs, reqs, lambda pid, c: c.unmask(reqs[pid]))
    devs.clear()  # the round is over for this node: drop every device secret of the session
    return reply(msg, {"responses": {str(p): wire.response_to(r) for p, r in out.items()}, "refused": refused})
