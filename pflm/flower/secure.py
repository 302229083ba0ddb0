"""Secure aggregation over Flower: the ServerApp runs only the server half, the SuperNodes run the device half.

Used by `FlowerNodes.train_round` when the driver's aggregator is a `RemoteSecureAggregator` (which
`FlowerNodes.attach` installs for `aggregation.kind=secure`, `aggregation.secagg.mode=full`). Each protocol round
is one Message-API exchange with the nodes that own cohort users (message type `train.secagg_<stage>`, handled by
`pflm.flower.secure_node` in the ClientApp):

    advertise → share → receive (complaints) → train (local training + clip + encode + mask) → [sign] → unmask

A node that fails or times out loses its devices from that stage on (as if they had dropped out); answers for
devices a node was not sent are ignored. The server sees advertisements, ciphertexts, complaints, masked
vectors and the shares it needs to unmask, and learns the sum (with the contributors' total train loss × tokens
and tokens as side values) — no per-device value.
"""

from __future__ import annotations

import dataclasses
import time
from logging import WARNING
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common import log

from pflm.aggregator.secagg import wire
from pflm.aggregator.secagg.remote import RemoteSecureAggregator
from pflm.driver.fanout import RoundTally
from pflm.flower import codec, ddp_node, shards
from pflm.flower.secure_node import MASKED, SECAGG, blob_record, read_blob
from pflm.round import RoundPlan

if TYPE_CHECKING:
    from pflm.flower.nodes import FlowerNodes

ACTION = "secagg_"  # message types train.secagg_<stage>


def exchange(fan: FlowerNodes, contents: dict[int, RecordDict], stage: str) -> dict[int, RecordDict | str]:
    """Send one message per partition, wait for the replies: partition → reply content, or why there is none."""
    parts = sorted(contents)
    msgs = [Message(contents[p], dst_node_id=fan.node_of_partition[p], message_type=f"train.{ACTION}{stage}")
            for p in parts]
    ids = list(fan.grid.push_messages(msgs)) if msgs else []
    out: dict[int, RecordDict | str] = {}
    if len(ids) != len(parts):
        return {p: "could not send the message" for p in parts}
    part_of = dict(zip(ids, parts))

    def on_reply(rep: Message) -> None:
        p = part_of[rep.metadata.reply_to_message_id]
        out[p] = f"node failed: {rep.error.reason}" if rep.has_error() else rep.content

    for mid in fan._collect(set(ids), on_reply):
        out[part_of[mid]] = "no answer within the round timeout"
    return out


def _blob(rec: RecordDict | str) -> dict | None:
    if isinstance(rec, str):
        return None
    try:
        return read_blob(rec)
    except (KeyError, ValueError, TypeError):
        return None


class SecureRound:
    """One round of the protocol between the ServerApp (`agg`) and the nodes of `fan`."""

    def __init__(self, fan: FlowerNodes, plan: RoundPlan, agg: RemoteSecureAggregator) -> None:
        self.fan, self.plan, self.agg = fan, plan, agg
        n_parts = len(fan.node_of_partition)
        self.pids_of: dict[int, list[int]] = {}
        for u in plan.cohort:
            self.pids_of.setdefault(shards.owner(u, n_parts), []).append(agg.pseudonym[int(u)])
        self.node_failed: set[int] = set()  # pseudonyms lost with their node
        self.nonfinite: set[int] = set()
        self._last_contents: dict[int, RecordDict] = {}
        self.sid = wire.b64(agg.session.session_id) if agg.failure is None else ""

    # ------------------------------------------------------------------------------------------ helpers
    def _send(self, stage: str, requests: dict[int, dict], extra: dict[int, RecordDict] | None = None) -> dict[int, dict]:
        """One stage: partition → request blob; returns partition → reply blob for the nodes that answered."""
        contents = {}
        for p, obj in requests.items():
            rd = extra[p] if extra else RecordDict()
            rd[SECAGG] = blob_record({"session-id": self.sid, **obj})
            contents[p] = rd
        t0 = time.perf_counter()
        replies = exchange(self.fan, contents, stage)
        self._last_contents = {p: rec for p, rec in replies.items() if not isinstance(rec, str)}
        self.agg._secs[{"advertise": "advertise", "share": "share", "receive": "share", "train": "masked_input",
                        "sign": "unmask_clients", "unmask": "unmask_clients"}[stage]] += time.perf_counter() - t0
        out = {}
        for p, rec in replies.items():
            blob = _blob(rec)
            if blob is None:
                why = rec if isinstance(rec, str) else "malformed reply"
                log(WARNING, "[pflm] round %d secagg %s: partition %d: %s; its devices leave the round",
                    self.plan.round, stage, p, why)
                for pid in self.pids_of[p]:
                    if pid not in self.agg.left:
                        self.node_failed.add(pid)
                        self.agg.refuse(pid, why, protocol=False)
                continue
            mine = set(self.pids_of[p])
            for pid, why in blob.get("refused", {}).items():
                if int(pid) in mine:
                    self.agg.refuse(int(pid), str(why))
            blob["_mine"] = mine
            out[p] = blob
        return out

    def _owned(self, blob: dict, key: str) -> dict[int, object]:
        """blob[key] keyed by pseudonym, restricted to the devices of the answering node (strays are ignored)."""
        got = {int(k): v for k, v in blob.get(key, {}).items()}
        stray = sorted(set(got) - blob["_mine"])
        if stray:
            log(WARNING, "[pflm] round %d: a node answered for devices %s it was not sent; ignored",
                self.plan.round, stray[:5])
        return {k: v for k, v in got.items() if k in blob["_mine"] and k not in self.agg.left}

    def _alive(self, pids) -> list[int]:
        return [p for p in pids if p not in self.agg.left]

    # ------------------------------------------------------------------------------------------ the round
    def run(self) -> RoundTally:
        agg, plan = self.agg, self.plan
        m = {"cohort": len(plan.cohort)}
        if agg.failure is None:
            self._protocol()
        else:
            agg.finish({})
        failed_users = len(self.node_failed)
        m["nonfinite_dropped"] = len(self.nonfinite)
        if failed_users:
            m["node_dropped"] = failed_users
        loss_sum, tokens = agg.side_tally()
        return RoundTally(m, loss_sum, tokens)

    def _protocol(self) -> None:
        agg, parts = self.agg, sorted(self.pids_of)
        session = wire.session_to(agg.session)
        config = dataclasses.asdict(agg.config)
        reqs = {p: {"session": session, "config": config,
                    "devices": [[agg.user_of[pid], pid] for pid in self.pids_of[p]]} for p in parts}
        ads, keys = [], {}
        for p, blob in self._send("advertise", reqs).items():
            mine = blob["_mine"]
            keys.update({int(k): wire.unb64(v) for k, v in blob.get("keys", {}).items() if int(k) in mine})
            for d in blob.get("ads", []):
                ad = wire.ad_from(d)
                if ad.device_id in mine and ad.device_id not in agg.left:
                    ads.append(ad)
        if agg.session.malicious:
            agg.register_keys(keys)
        advertised = agg.receive_advertisements(ads)
        all_ads = [wire.ad_to(a) for a in advertised.values()]
        registry = wire.registry_to(agg.registry) if agg.session.malicious else None

        reqs = {}
        for p in parts:
            nbs = {str(pid): nb for pid in self._alive(self.pids_of[p]) if pid in advertised
                   and (nb := agg.share_request(pid)) is not None}
            if nbs:
                reqs[p] = {"ads": all_ads, "neighbours": nbs, "registry": registry}
        outboxes = {}
        for p, blob in self._send("share", reqs).items():
            for pid, box in self._owned(blob, "outboxes").items():
                outboxes[pid] = {int(m["to"]): wire.share_from(m) for m in box}
        inboxes = agg.route_shares(outboxes)

        reqs = {}
        for p in parts:
            boxes = {str(pid): [wire.share_to(m) for m in inboxes[pid].values()]
                     for pid in self.pids_of[p] if pid in inboxes}
            if boxes:
                reqs[p] = {"inboxes": boxes}
        complaints = {}
        for p, blob in self._send("receive", reqs).items():
            complaints.update({pid: [int(v) for v in bad] for pid, bad in self._owned(blob, "complaints").items()})
        u2 = agg.receive_complaints(complaints, inboxes)
        if agg.failure is not None:
            agg.finish({})
            return

        self._train(u2)
        responders = agg.responders()
        if agg.session.malicious:  # consistency check: every survivor signs the U3 it is told
            u3 = agg.u3()
            reqs = {p: {"devices": pids, "u3": u3} for p in sorted(self.pids_of)
                    if (pids := [pid for pid in self.pids_of[p] if pid in responders])}
            signed = set()
            for p, blob in self._send("sign", reqs).items():
                for pid, sig in self._owned(blob, "sigs").items():
                    if agg.receive_signature(pid, wire.unb64(sig)):
                        signed.add(pid)
            responders = {v for v in agg.responders() if v in signed}
        if agg.recovery_problem(responders):  # ask for no share when the round cannot complete anyway
            agg.finish({})
            return
        reqs = {}
        for p in parts:
            rq = {str(pid): wire.request_to(agg.unmask_request(pid)) for pid in self.pids_of[p] if pid in responders}
            if rq:
                reqs[p] = {"requests": rq}
        responses = {}
        for p, blob in self._send("unmask", reqs).items():
            for pid, r in self._owned(blob, "responses").items():
                resp = wire.response_from(r)
                if resp.device_id == pid:
                    responses[pid] = resp
        agg.finish(responses)

    def _train(self, u2: set[int]) -> None:
        agg, fan, plan = self.agg, self.fan, self.plan
        reqs, extra = {}, {}
        for p in sorted(self.pids_of):
            pids = [pid for pid in self._alive(self.pids_of[p]) if pid in u2]
            if not pids:
                continue
            users = [agg.user_of[pid] for pid in pids]
            extra[p] = codec.encode_train(plan, users, fan.threads, fan.spec_json)
            reqs[p] = {"devices": [[agg.user_of[pid], pid] for pid in pids],
                       "mask_lists": {str(pid): agg.mask_list(pid) for pid in pids}, "codec": agg.codec_params()}
        sent = {p: set(reqs[p]["mask_lists"]) for p in reqs}
        replies = self._send("train", reqs, extra)
        for p, blob in replies.items():
            for pid in blob.get("nonfinite", []):
                if int(pid) in blob["_mine"]:
                    self.nonfinite.add(int(pid))
                    agg.nonfinite += 1
        for p, rec in self._last_contents.items():
            if p not in replies or MASKED not in rec.array_records:
                continue
            for key, arr in rec.array_records[MASKED].items():
                pid = int(key)
                if key not in sent[p] or pid in agg.left or pid in self.nonfinite:
                    continue
                y = np.asarray(arr.numpy())
                nbytes = y.nbytes
                if hasattr(agg.codec, "public_params"):  # distributed DP: the rotated part arrives bit-packed
                    c = agg.codec
                    y = ddp_node.unpack_masked(y, c.rotated, c.scale.modulus_bits, c.length, agg.session.dtype)
                    if y is None:
                        y = np.zeros(0, dtype=np.uint8)  # wrong size: receive_masked drops the device
                agg.receive_masked(pid, y, nbytes)

