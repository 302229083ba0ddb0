"""Secure aggregation over Flower with the device half on the nodes (issue 15), on the in-process LoopGrid.

The ServerApp runs only `SecAggServer` (`RemoteSecureAggregator`); the real ClientApp functions run the device
half and keep their secrets in `context.state`. Checked: the model equals the in-process secure run's bit for
bit (reproducible mode), nothing the server receives contains a device's update (masked vectors look uniform
and are uncorrelated with the update), per-user losses stay inside the secure sum, and a node that answers for
strangers, refuses, or fails mid-protocol drops only its own users.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, Context, Error, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

import pflm.device.update as device_update_module
from pflm.aggregator.base import RoundContext
from pflm.aggregator.secagg import SecAggConfig
from pflm.aggregator.secagg import wire
from pflm.aggregator.secagg.client import SecAggClient
from pflm.aggregator.secagg.masking import MaskStream, Session
from pflm.aggregator.secagg.protocol import SecAggServer
from pflm.aggregator.secagg.remote import RemoteSecureAggregator
from pflm.config import load_recipe
from pflm.flower import device as flower_device
from pflm.flower import secure_node
from pflm.flower.client_app import app as client_app
from pflm.flower.server_app import flower_driver
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides
from tests.test_flower_server import RECIPE, _cfg, _metrics, node_policy_file  # noqa: F401 (autouse fixture)


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class StageGrid:
    """LoopGrid for the secure stages: records every reply the server receives; `fail` = {(partition, stage)}
    makes that node crash at that stage; `tamper(stage, msg, partition)` may rewrite a request before the node
    sees it; `stray(stage, reply, partition)` may rewrite a reply."""

    def __init__(self, partitions, num_partitions, fail=frozenset(), tamper=None, stray=None) -> None:
        self.nodes = {
            100 + i: Context(run_id=1, node_id=100 + i, state=RecordDict(), run_config={},
                             node_config={"partition-id": p, "num-partitions": num_partitions})
            for i, p in enumerate(partitions)
        }
        self.fail, self.tamper, self.stray = set(fail), tamper, stray
        self.replies: dict[str, Message] = {}
        self.seen: list[tuple[str, int, RecordDict]] = []  # (stage, partition, reply content): the server's view

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id
            node = m.metadata.dst_node_id
            ctx = self.nodes[node]
            p = ctx.node_config["partition-id"]
            stage = m.metadata.message_type.split(".secagg_")[-1]
            if (p, stage) in self.fail:
                rep = Message(Error(code=0, reason="simulated crash"), reply_to=m)
            else:
                if self.tamper:
                    self.tamper(stage, m, p)
                rep = client_app(m, ctx)
                if self.stray and not rep.has_error():
                    rep = self.stray(stage, rep, m, p) or rep
                if not rep.has_error() and ".secagg_" in m.metadata.message_type:
                    self.seen.append((stage, p, rep.content))
            rep.metadata.__dict__["_src_node_id"] = node
            self.replies[m.metadata.message_id] = rep
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


def _secure_cfg(data, tmp_path, **extra):
    base = {"server.rounds": 1, "server.cohort_size": 8, "aggregation.kind": "secure"}
    base.update(extra)
    return _cfg(data, tmp_path, **base)


@pytest.fixture
def recorded(monkeypatch):
    """Every clipped update the nodes compute: user → float32 vector (what must never reach the server)."""
    seen: dict[int, np.ndarray] = {}
    real = device_update_module.device_update

    def spy(trainer, steps, ctx, user, sentences, key):
        res, vec, aux = real(trainer, steps, ctx, user, sentences, key)
        seen[int(user)] = vec.detach().reshape(-1).numpy().astype(np.float32).copy()
        return res, vec, aux

    monkeypatch.setattr(device_update_module, "device_update", spy)
    monkeypatch.setattr(flower_device, "device_update", spy)  # the node-side loop's own reference
    return seen


def _result(sim):
    """Wrap the aggregator's finalize so the test sees the AggregateResult of each round."""
    out = []
    real = sim.aggregator.finalize

    def fin():
        res = real()
        out.append(res)
        return res

    sim.aggregator.finalize = fin
    return out


# ---------------------------------------------------------------------------------------------------- equality
@pytest.mark.parametrize("variant", ["semi-honest", "malicious"])
def test_device_half_on_nodes_matches_inprocess_bit_for_bit(synthetic_data, tmp_path, variant):
    extra = {"server.rounds": 2, "server.cohort_size": 8, "aggregation.kind": "secure", "server.sampling": "fixed"}
    if variant == "malicious":
        extra["aggregation.secagg.malicious"] = "true"
    cfg = _cfg(synthetic_data, tmp_path / "fl", **extra)
    sim = flower_driver(cfg, StageGrid([0, 1, 2], 3))
    assert isinstance(sim.aggregator, RemoteSecureAggregator)
    sim.run(progress=False)
    ref = load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path / "ip"), **extra))
    Simulator(ref).run(progress=False)
    a, b = load_file(str(cfg.run_dir / "model.safetensors")), load_file(str(ref.run_dir / "model.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k  # same users, same seed-derived rounding: the same integer sum
    fl, ip = _metrics(cfg), _metrics(ref)
    for m, r in zip(fl, ip):
        assert m["contributors"] == 8 and m["secagg_survivors"] == 8 and m["secagg_misbehaving"] == 0
        assert math.isclose(m["train_loss"], r["train_loss"], rel_tol=2e-3)  # via the secure sum's side values


def test_without_reproducible_mode_the_sum_is_within_quantisation(synthetic_data, tmp_path, recorded):
    cfg = _secure_cfg(synthetic_data, tmp_path, **{"privacy.reproducible": "false"})
    sim = flower_driver(cfg, StageGrid([0, 1, 2], 3))
    results = _result(sim)
    sim.run_round(0)
    res = results[0]
    expect = np.sum([recorded[u] for u in sim.server.plan_round(0).cohort], axis=0, dtype=np.float64)
    bound = res.metrics["secagg_quant_error_bound"] + 8 * res.metrics["secagg_rounding_slack"]
    assert res.num_contributors == 8
    assert np.max(np.abs(res.total.numpy() - expect)) <= bound


# ---------------------------------------------------------------------------------------------------- the server's view
def _top_bits_chi2(words: np.ndarray, bits: int = 32, top: int = 4) -> float:
    counts = np.bincount((words.astype(np.uint64) >> (bits - top)).astype(np.int64), minlength=1 << top)
    expected = words.size / (1 << top)
    return float(np.sum((counts - expected) ** 2 / expected))


def test_server_never_receives_an_update(synthetic_data, tmp_path, recorded):
    cfg = _secure_cfg(synthetic_data, tmp_path)
    grid = StageGrid([0, 1, 2], 3)
    sim = flower_driver(cfg, grid)
    sim.run_round(0)
    agg = sim.aggregator
    assert len(recorded) == 8
    raw = b"".join(
        bytes(arr.data) if hasattr(arr, "data") else b""
        for _, _, content in grid.seen for rec in content.array_records.values() for arr in rec.values()
    ) + b"".join(bytes(c["blob"]) for _, _, content in grid.seen for c in content.config_records.values())
    chi2_limit = 45.0  # 15 degrees of freedom: P[chi2 > 45] ≈ 7e-5
    masked = {}
    for stage, _, content in grid.seen:
        if stage == "train":  # only masked vectors and the lists of failed devices: no loss, tokens or timing
            assert set(content.array_records) == {secure_node.MASKED} and not content.metric_records
            assert set(secure_node.read_blob(content)) == {"nonfinite", "refused"}
            masked.update({int(k): a.numpy() for k, a in content.array_records[secure_node.MASKED].items()})
    assert len(masked) == 8
    for user, vec in recorded.items():
        assert vec[:16].tobytes() not in raw and vec[-16:].tobytes() not in raw
        y = masked[agg.pseudonym[user]][: vec.size]
        assert _top_bits_chi2(y) < chi2_limit
        signed = y.view(np.int32).astype(np.float64)
        assert abs(np.corrcoef(signed, vec.astype(np.float64))[0, 1]) < 0.05
    # the test has power: the unmasked fixed-point encoding fails it
    codec = agg.codec
    enc = codec.encode(next(iter(recorded.values())), 1.0, {}, b"k" * 32).ints[: codec.dim]
    assert _top_bits_chi2(enc) > 1000
    for grid_ctx in grid.nodes.values():  # the round is over: no device secret stays behind
        assert secure_node.STATE not in grid_ctx.state


def test_device_secrets_live_in_context_state_between_stages(synthetic_data, tmp_path):
    cfg = _secure_cfg(synthetic_data, tmp_path)
    snapshots = []

    def tamper(stage, msg, p):
        if stage == "train":  # before the masking stage: the devices' state is on the node, and only there
            ctx = next(c for c in grid.nodes.values() if c.node_config["partition-id"] == p)
            rec = ctx.state.config_records[secure_node.STATE]
            snapshots.append({k: bytes(v) if isinstance(v, bytes) else v for k, v in rec.items()})

    grid = StageGrid([0, 1, 2], 3, tamper=tamper)
    sim = flower_driver(cfg, grid)
    sim.run_round(0)
    secrets_ = []
    for snap in snapshots:
        for k, v in snap.items():
            if k.startswith("dev."):
                state = wire.unpack(v)
                secrets_ += [wire.unb64(state["s_sk"]), wire.unb64(state["c_sk"]), wire.unb64(state["b_seed"])]
    assert len(secrets_) == 3 * 8
    wire_bytes = b"".join(bytes(c["blob"]) for _, _, content in grid.seen for c in content.config_records.values())
    for s in secrets_:
        assert s not in wire_bytes and wire.b64(s).encode() not in wire_bytes


# ---------------------------------------------------------------------------------------------------- misbehaving nodes
def test_answers_for_strangers_are_ignored(synthetic_data, tmp_path):
    extra = {"server.sampling": "fixed"}
    clean = flower_driver(_secure_cfg(synthetic_data, tmp_path / "a", **extra), StageGrid([0, 1, 2], 3))
    clean_res = _result(clean)
    clean.run_round(0)

    def stray(stage, rep, msg, p):  # every node also answers for the other nodes' devices
        if stage != "train":
            return None
        content = rep.content
        arrays = content.array_records[secure_node.MASKED]
        n = len(sim.aggregator.cohort)
        sent = {pid for _, pid in secure_node.read_blob(msg.content)["devices"]}
        for pid in range(n):
            if pid not in sent:
                arrays[str(pid)] = Array(np.full(sim.aggregator.codec.length, 7, dtype=np.uint32))
        blob = secure_node.read_blob(content)
        blob["nonfinite"] = [pid for pid in range(n) if pid not in sent]  # and claims the others' updates were NaN
        content[secure_node.SECAGG] = secure_node.blob_record(blob)
        return Message(content, reply_to=msg)

    sim = flower_driver(_secure_cfg(synthetic_data, tmp_path / "b", **extra), StageGrid([0, 1, 2], 3, stray=stray))
    res = _result(sim)
    m = sim.run_round(0)
    assert m["contributors"] == 8
    torch.testing.assert_close(res[0].total, clean_res[0].total, rtol=0, atol=2 * res[0].metrics["secagg_quant_error_bound"])


def _partition_users(sim, r, p, n=3):
    return [u for u in sim.server.plan_round(r).cohort if u % n == p]


def _expected(recorded, users):
    return np.sum([recorded[u] for u in users], axis=0, dtype=np.float64)


@pytest.mark.parametrize("stage", ["advertise", "train", "unmask"])
def test_a_node_failing_mid_protocol_drops_only_its_users(synthetic_data, tmp_path, recorded, stage):
    cfg = _secure_cfg(synthetic_data, tmp_path, **{"server.cohort_size": 12, "aggregation.secagg.threshold": 0.51})
    sim = flower_driver(cfg, StageGrid([0, 1, 2], 3, fail={(1, stage)}))
    results = _result(sim)
    m = sim.run_round(0)
    cohort = sim.server.plan_round(0).cohort
    lost = _partition_users(sim, 0, 1)
    assert 0 < len(lost) <= 5, "the fixed sample must leave enough survivors for t = 6"
    if stage == "unmask":  # its masked inputs arrived: its users stay in the sum, the others unmask for them
        kept = cohort
    else:
        kept = [u for u in cohort if u not in lost]
    assert "failed" not in m, m.get("failed")
    assert m["contributors"] == len(kept) and m["node_dropped"] == len(lost) and m["secagg_refusals"] == 0
    res = results[0]
    err = np.max(np.abs(res.total.numpy() - _expected(recorded, kept)))
    assert err <= res.metrics["secagg_quant_error_bound"] + len(kept) * res.metrics["secagg_rounding_slack"]


def test_a_refusing_node_drops_only_its_users(synthetic_data, tmp_path, recorded):
    def tamper(stage, msg, p):  # the server asks partition 1's devices to mask with a stranger: they refuse
        if stage == "train" and p == 1:
            blob = secure_node.read_blob(msg.content)
            blob["mask_lists"] = {k: v[:-1] + [10**6] for k, v in blob["mask_lists"].items()}
            msg.content[secure_node.SECAGG] = secure_node.blob_record(blob)

    cfg = _secure_cfg(synthetic_data, tmp_path, **{"server.cohort_size": 12, "aggregation.secagg.threshold": 0.51})
    sim = flower_driver(cfg, StageGrid([0, 1, 2], 3, tamper=tamper))
    results = _result(sim)
    m = sim.run_round(0)
    lost = _partition_users(sim, 0, 1)
    kept = [u for u in sim.server.plan_round(0).cohort if u not in lost]
    assert "failed" not in m, m.get("failed")
    assert m["contributors"] == len(kept) and m["secagg_refusals"] == len(lost)
    res = results[0]
    err = np.max(np.abs(res.total.numpy() - _expected(recorded, kept)))
    assert err <= res.metrics["secagg_quant_error_bound"] + len(kept) * res.metrics["secagg_rounding_slack"]


def test_malicious_variant_survives_a_node_failing_at_the_consistency_check(synthetic_data, tmp_path, recorded):
    extra = {"server.cohort_size": 12, "aggregation.secagg.malicious": "true", "aggregation.secagg.threshold": 0.67}
    cfg = _secure_cfg(synthetic_data, tmp_path, **extra)
    grid = StageGrid([0, 1, 2], 3)
    sim = flower_driver(cfg, grid)
    cohort = sim.server.plan_round(0).cohort
    small = min(range(3), key=lambda p: len(_partition_users(sim, 0, p)))
    assert 0 < len(_partition_users(sim, 0, small)) <= 3, "the fixed sample must leave t = 8 signers"
    grid.fail = {(small, "sign")}
    results = _result(sim)
    m = sim.run_round(0)
    assert "failed" not in m, m.get("failed")
    assert m["contributors"] == len(cohort)  # their masked inputs arrived; the others unmask for them
    res = results[0]
    err = np.max(np.abs(res.total.numpy() - _expected(recorded, cohort)))
    assert err <= res.metrics["secagg_quant_error_bound"] + len(cohort) * res.metrics["secagg_rounding_slack"]


def test_too_few_survivors_leave_the_model_untouched(synthetic_data, tmp_path):
    cfg = _secure_cfg(synthetic_data, tmp_path)
    sim = flower_driver(cfg, StageGrid([0, 1, 2], 3, fail={(0, "train"), (1, "train")}))
    before = {k: v.clone() for k, v in sim.server.model.state_dict().items()}
    m = sim.run_round(0)
    assert "failed" in m and sim.server.rounds_done == 0
    for k, v in sim.server.model.state_dict().items():
        assert torch.equal(v, before[k]), k


# ---------------------------------------------------------------------------------------------------- device state
def test_client_state_round_trip_through_every_stage():
    """A device written to bytes and read back before every protocol round gives the same revealed sum."""
    import secrets

    n, dim, bits = 5, 64, 32
    cfg = SecAggConfig()
    t = cfg.threshold_for(n - 1, n)
    s = Session(secrets.token_bytes(16), 0, bits, t, {u: u + 1 for u in range(n)}, n - 1)
    srv = SecAggServer(s)
    blobs = {u: wire.client_state(SecAggClient(u, s, cfg)) for u in range(n)}

    def step(u, fn):
        c = wire.restore_client(blobs[u])
        out = fn(c)
        blobs[u] = wire.client_state(c)
        return out

    ads = [wire.ad_from(wire.ad_to(step(u, lambda c: c.advertise()))) for u in range(n)]
    srv.receive_advertisements(ads)
    outboxes = {}
    for u in range(n):
        ads_u, nb = srv.share_keys_request(u)
        box = step(u, lambda c: c.share_keys(ads_u, nb))
        outboxes[u] = {v: wire.share_from(wire.share_to(m)) for v, m in box.items()}
    inboxes = srv.route_shares(outboxes)
    srv.receive_complaints({v: step(v, lambda c: c.receive_shares(box)) for v, box in inboxes.items()})
    rng = np.random.default_rng(0)
    xs = {u: rng.integers(0, 1000, dim, dtype=np.uint32) for u in range(n)}
    for u in range(n - 1):  # device n−1 drops before masking
        srv.receive_masked(u, step(u, lambda c: c.masked_input(xs[u], srv.mask_list(u), None)))
    responses = {}
    for v in range(n - 1):
        req = wire.request_from(wire.request_to(srv.unmask_request(v)))
        responses[v] = wire.response_from(wire.response_to(step(v, lambda c: c.unmask(req))))
    total = srv.finish(responses, MaskStream(dim, bits))
    assert np.array_equal(total, np.sum([xs[u] for u in range(n - 1)], axis=0, dtype=np.uint32))
    again = wire.restore_client(blobs[0])
    with pytest.raises(Exception, match="second unmasking"):
        again.unmask(req)


def test_remote_aggregator_refuses_local_uploads():
    agg = RemoteSecureAggregator(SecAggConfig())
    agg.begin(RoundContext(0, 8, [3, 5, 9, 11], 1.0, 0))
    assert sorted(agg.cohort) == [0, 1, 2, 3] and set(agg.pseudonym) == {3, 5, 9, 11}
    with pytest.raises(Exception, match="own machines"):
        agg.add(3, torch.zeros(8), 1.0)


# ---------------------------------------------------------------------------------------------------- the PKI
def _enrol_everyone(grid, population: int) -> list[str]:
    """Every training user's long-term key, made on its own node: the PKI's registry, from outside the server."""
    keys = []
    for ctx in grid.nodes.values():
        p, n = ctx.node_config["partition-id"], ctx.node_config["num-partitions"]
        devs = secure_node.NodeDevices(ctx)
        keys += [wire.b64(devs.enrol(u)) for u in range(population) if u % n == p]
    return keys


@pytest.mark.parametrize("pki", [False, True])
def test_key_swap_impersonation_needs_the_nodes_trusted_registry(synthetic_data, tmp_path, node_policy_file, pki):
    """Attack (malicious server, Bonawitz et al. §4 needs a PKI for this): swap one device's registry key for the
    server's own and re-sign that device's advertisement with it, so honest devices encrypt their shares to keys the
    server holds. With only the ServerApp's registry (pinned on first use) the honest devices go along; with the
    PKI's keys in the node policy (`trusted_keys`) every device refuses and the round fails safely."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from pflm.aggregator.secagg.messages import Advertisement, DeviceIdentity

    cfg = _secure_cfg(synthetic_data, tmp_path, **{"aggregation.secagg.malicious": "true"})
    fake = DeviceIdentity(0)
    fake_pk = [X25519PrivateKey.generate().public_key().public_bytes(Encoding.Raw, PublicFormat.Raw) for _ in range(2)]
    seen: dict = {}

    def tamper(stage, msg, p):
        if stage not in ("advertise", "share"):
            return
        blob = secure_node.read_blob(msg.content)
        if stage == "advertise":
            seen["session"] = wire.session_from(blob["session"])
        if stage != "share":
            return
        v = seen.setdefault("victim", min(int(u) for u in blob["registry"]))
        blob["registry"][str(v)] = wire.b64(fake.public_key)
        for i, d in enumerate(blob["ads"]):
            if int(d["u"]) == v:
                ad = Advertisement(v, fake_pk[0], fake_pk[1], wire.unb64(d["b"]))
                ad = Advertisement(v, ad.c_pk, ad.s_pk, ad.b_commit, fake.sign(ad.payload(seen["session"])))
                blob["ads"][i] = wire.ad_to(ad)
        msg.content[secure_node.SECAGG] = secure_node.blob_record(blob)

    grid = StageGrid([0, 1, 2], 3, tamper=tamper)
    sim = flower_driver(cfg, grid)
    if pki:
        policy = json.loads(node_policy_file.read_text())
        policy["trusted_keys"] = _enrol_everyone(grid, sim.population)
        node_policy_file.write_text(json.dumps(policy))
    m = sim.run_round(0)
    replies = [secure_node.read_blob(content) for stage, _, content in grid.seen if stage == "share"]
    to_victim = [s for r in replies for box in r["outboxes"].values() for s in box if int(s["to"]) == seen["victim"]]
    refused = [why for r in replies for why in r["refused"].values()]
    if pki:
        assert not to_victim and len(refused) == 8 and all("trusted registry" in w or "own long-term" in w
                                                            for w in refused)
        assert "failed" in m  # below threshold: model and accountant untouched
    else:
        assert len(to_victim) == 7  # every honest device encrypted its shares to the server's key
