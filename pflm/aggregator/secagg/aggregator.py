"""`SecureAggregator`: the secure-aggregation protocol behind the streaming `Aggregator` interface.

`begin` runs AdvertiseKeys and ShareKeys for the cohort, `upload` runs the device's encoding and masking (the
same `SecAggClient` code a real device runs; thread-safe, so simulated devices can mask concurrently),
`receive` sums the masked vector on the server, `drop` marks a dropout, `finalize` runs Unmasking and decodes.
`mode="simulate"` skips the cryptography but draws the same dropouts and survivor sets (and, with
`rounding="seeded"`, the same rounding), so its integer sum is then bit-identical to the full protocol's.

Before encoding, each device scales its update to norm ≤ clip_bound·weight − the codec's rounding slack
(`FixedPointCodec.fit_norm`), so no rounding outcome can raise a contribution's norm above the clip bound the
accountant assumes; `begin` raises ConfigError when that slack would exceed 1% of the clip bound. Rounding keys
are fresh OS-CSPRNG keys per upload (`rounding="urandom"`, the default), or — in a simulation that hands the
aggregator its secret run key — subkey(run_key, "secagg-rounding", round, device): just as secret to anyone
without the run key, and redrawn identically on resume / in reproducible runs. `rounding="seeded"` derives them
from the public seed (reproducible, NOT secret).
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from typing import Any

import numpy as np
import torch

from pflm.aggregator.base import AggregateResult, Aggregator, RoundContext, Upload
from pflm.aggregator.secagg import shamir
from pflm.aggregator.secagg.client import SecAggClient
from pflm.aggregator.secagg.config import SecAggConfig
from pflm.aggregator.secagg.fixed_point import FixedPointCodec, rounding_key
from pflm.aggregator.secagg.graph import effective_degree, graph_seed, harary_graph
from pflm.aggregator.secagg.masking import MaskStream, Session, word_dtype
from pflm.aggregator.secagg.protocol import SecAggServer, key_sharing_survivors, recovery_problem
from pflm.errors import AggregationFailed
from pflm.runtime import resolve_workers
from pflm.secure_random import subkey

STAGES = ("advertise", "share", "masked_input", "unmask")
QUANT_PROBES = 1 << 16  # coordinates compared with the float sum for secagg_quant_error_max (an even stride)


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
    share_msg = 16 + 16 + 2 * shamir.SHARE_BYTES + 16  # ids, (sender,receiver) header, 2 shares, AEAD tag
    return 104 + degree * share_msg + (length * bits + 7) // 8 + 8 + degree * (8 + shamir.SHARE_BYTES)


def make_secure_aggregator(options: dict[str, Any] | None, seed: int | None = None,
                           run_key: bytes | None = None) -> SecureAggregator:
    """The recipe's `aggregation: secure` aggregator (options = the `aggregation.secagg` mapping); `run_key`: the
    simulation's secret run key, which then keys the (default, secret) stochastic rounding of every upload."""
    return SecureAggregator.from_options(options, seed, run_key)


class SecureAggregator(Aggregator):
    """Secure aggregation of a round's updates, weights and aux scalars (see the package docstring).

    `finalize` metrics: secagg_wraps (coordinates clamped to their bound, summed over devices),
    secagg_quant_step / secagg_quant_error_bound (per-coordinate step and worst-case error of the sum),
    secagg_quant_error_max (simulation diagnostic against the in-process float sum, on ≤ 65,536 evenly spaced
    coordinates), survivor counts,
    secagg_bad_shares, secagg_bytes_per_device_mean/max (upload), secagg_seconds_<stage>.
    """

    name = "secure"

    @classmethod
    def from_options(cls, options: dict[str, Any] | None, seed: int | None = None,
                     run_key: bytes | None = None) -> SecureAggregator:
        """Build from a recipe's `aggregation.secagg` mapping (unknown keys → ConfigError with a suggestion)."""
        from pflm.config_base import from_dict

        return cls(from_dict(SecAggConfig, dict(options or {}), "aggregation.secagg"), seed, run_key)

    def __init__(self, config: SecAggConfig | None = None, seed: int | None = None,
                 run_key: bytes | None = None) -> None:
        self.config = config or SecAggConfig()
        # secret key of the simulated devices' rounding streams (rounding="urandom"); None = fresh OS randomness
        self._rounding_secret = None if run_key is None else subkey(run_key, "secagg-rounding")
        self.workers = resolve_workers(self.config.threads)
        self._lock = threading.Lock()
        self.run_seed = seed  # public seed of graphs, simulated dropouts and rounding; None = ctx.seed
        self.ctx: RoundContext | None = None
        self.codec: FixedPointCodec | None = None
        self.last_sum: np.ndarray | None = None  # revealed Σ of encoded inputs mod 2^b (tests, audits)
        self.transcript: dict[str, Any] = {}
        self.server: SecAggServer | None = None
        self.clients: dict[int, SecAggClient] = {}  # simulated devices (full mode)
        self._contributed: set[int] = set()
        self._dropped: set[int] = set()

    @property
    def contributors(self) -> list[int]:
        """Devices whose masked input is in this round's sum so far (U3)."""
        return sorted(self._contributed)

    # ---------------------------------------------------------------- begin: AdvertiseKeys + ShareKeys
    def begin(self, ctx: RoundContext) -> None:
        cfg = self.config
        self.ctx = ctx
        self.codec = None
        self.last_sum = None
        self._failure: str | None = None
        self._seen: set[int] = set()
        self._dropped: set[int] = set()
        self._contributed: set[int] = set()
        self._excluded = {"not_in_key_sharing": 0, "nonfinite": 0, "simulated_dropout": 0}
        self._secs = {k: 0.0 for k in ("advertise", "share", "encode", "masked_input", "sum", "unmask_clients", "unmask_server")}
        self._float_sum: np.ndarray | None = None
        self._acc: np.ndarray | None = None
        self.transcript = {"masked": {}, "requests": {}, "responses": {}} if cfg.keep_transcript else {}
        cohort = sorted(set(int(u) for u in ctx.cohort))
        if len(cohort) != len(ctx.cohort):
            raise AggregationFailed(f"round {ctx.round}: the cohort lists a device twice")
        self.cohort = cohort
        self._cohort_set = set(cohort)
        self.clients = {}
        self.server = None
        n = len(cohort)
        self._seed = ctx.seed if self.run_seed is None else self.run_seed
        self.plan = dropout_plan(cfg, self._seed, ctx.round, cohort)
        if n < 3:
            self._failure = f"secure aggregation needs a cohort of at least 3 devices, got {n}"
            return
        if not (math.isfinite(ctx.clip_bound) and ctx.clip_bound > 0):
            self._failure = f"the clip bound must be finite and > 0 to fix the encoding scale, got {ctx.clip_bound}"
            return
        try:  # the rounding slack depends only on bits, cohort, dim and the value bound (not on the aux layout)
            probe = FixedPointCodec(cfg.bits, n, ctx.dim, ctx.clip_bound * cfg.value_factor, cfg.max_weight, (),
                                    cfg.aux_bound)
        except AggregationFailed:
            probe = None  # bits too small for the cohort: the first upload raises the usual message
        if probe is not None:
            probe.check_slack(ctx.clip_bound)
        self.degree = effective_degree(n, cfg.degree(n))
        self.threshold = cfg.threshold_for(self.degree)
        self.graph = harary_graph(cohort, cfg.degree(n), graph_seed(self._seed, ctx.round))
        self.session = Session(
            session_id=secrets.token_bytes(16),
            round=ctx.round,
            bits=cfg.bits,
            threshold=self.threshold,
            x_of={u: i + 1 for i, u in enumerate(cohort)},
        )
        advertised = {u for u in cohort if self.plan.get(u) != "advertise"}
        if cfg.mode == "simulate":
            sent = {
                u
                for u in advertised
                if self.plan.get(u) != "share" and len(self.graph[u] & advertised) >= self.threshold
            }
            self.u2 = key_sharing_survivors(self.graph, advertised, sent, self.threshold)
        else:
            self._begin_full(advertised)
        if len(self.u2) < self.threshold:
            self._failure = (
                f"only {len(self.u2)} of {n} devices completed key sharing, fewer than the threshold {self.threshold}"
            )

    def _begin_full(self, advertised: set[int]) -> None:
        t0 = time.perf_counter()
        self.clients = {u: SecAggClient(u, self.session) for u in sorted(advertised)}
        self.server = SecAggServer(self.session, self.graph)
        self.server.receive_advertisements([c.advertise() for c in self.clients.values()])
        t1 = time.perf_counter()
        outboxes: dict[int, dict[int, bytes]] = {}
        for u, client in self.clients.items():
            if self.plan.get(u) == "share":
                continue
            peers = self.server.peers_of(u)
            if len(peers) < self.threshold:
                continue  # the device cannot share its secrets safely: it leaves the round
            outboxes[u] = client.share_keys(peers)
        inboxes = self.server.route_shares(outboxes)
        for v, inbox in inboxes.items():
            self.clients[v].receive_shares(inbox)
        self.u2 = set(self.server.u2)
        self._secs["advertise"], self._secs["share"] = t1 - t0, time.perf_counter() - t1
        if self.config.keep_transcript:
            self.transcript["ads"] = dict(self.server.ads)
            self.transcript["ciphertexts"] = {u: dict(o) for u, o in outboxes.items()}

    # ---------------------------------------------------------------- add: device-side encoding + masking
    def _make_codec(self, aux: dict[str, float]) -> FixedPointCodec:
        assert self.ctx is not None
        cfg = self.config
        keys = tuple(cfg.aux_keys or self.ctx.extra.get("aux_keys") or sorted(aux))
        return FixedPointCodec(
            cfg.bits, len(self.cohort), self.ctx.dim, self.ctx.clip_bound * cfg.value_factor,
            cfg.max_weight, keys, cfg.aux_bound, self._upload_workers(),
        )

    def _upload_workers(self) -> int:
        """Threads for one device's encoding and masking: the CPU threads shared by the concurrent uploads."""
        return max(1, self.workers // max(1, self.concurrent_uploads))

    def _codec_for(self, aux: dict[str, float]) -> FixedPointCodec:
        """The round's codec (and mask stream), fixed by the first upload's aux layout; thread-safe."""
        with self._lock:
            if self.codec is None:
                self.codec = self._make_codec(aux)
                self._upload_stream = MaskStream(self.codec.length, self.config.bits, self._upload_workers())
                self._stream = MaskStream(self.codec.length, self.config.bits, self.workers)
            return self.codec

    def upload(self, device_id: int, update: torch.Tensor, weight: float, aux: dict[str, float] | None = None) -> Upload:
        """The device's side of MaskedInputCollection: encode (fixed point) and mask, fused in one pass."""
        if self.ctx is None:
            raise AggregationFailed("SecureAggregator.upload called before begin()")
        ctx, u, aux = self.ctx, int(device_id), dict(aux or {})
        if update.numel() != ctx.dim:
            raise AggregationFailed(f"device {u} sent an update of length {update.numel()}, expected {ctx.dim}")
        if u not in self._cohort_set:
            raise AggregationFailed(f"device {u} is not in the cohort of round {ctx.round}")
        if self._failure is not None:
            return Upload(u, excluded="round_failed")
        if u not in self.u2:
            return Upload(u, excluded="not_in_key_sharing")
        if self.plan.get(u) == "masked_input":
            return Upload(u, excluded="simulated_dropout")
        if not (math.isfinite(weight) and all(math.isfinite(v) for v in aux.values())):
            return Upload(u, excluded="nonfinite")
        codec = self._codec_for(aux)
        unknown = sorted(set(aux) - set(codec.aux_keys))
        if unknown:
            raise AggregationFailed(
                f"device {u} sent aux values {unknown} outside the round's layout {list(codec.aux_keys)}: "
                "list every aux name in aggregation.secagg.aux_keys"
            )
        x = update.detach().reshape(-1).cpu().numpy()  # float32 view; encoded chunk by chunk
        # The rounding must not raise the norm: shrink to ≤ C·weight − slack first (a copy; the caller's tensor
        # is untouched). With uniform weighting the weight is 1 and the decoded contribution has norm ≤ C.
        x = codec.fit_norm(x, ctx.clip_bound * max(float(weight), 0.0))
        t0 = time.perf_counter()
        if self.config.rounding == "seeded":
            key = rounding_key(self._seed, ctx.round, u)  # public: reproducible, not secret
        elif self._rounding_secret is not None:
            key = subkey(self._rounding_secret, "upload", ctx.round, u)  # secret, reproducible with the run key
        else:
            key = rounding_key(None, ctx.round, u)  # fresh from the OS CSPRNG
        if self.config.mode == "full":
            assert self.server is not None
            encoder = codec.encoder(x, float(weight), aux, key)
            payload = self.clients[u].masked_input(encoder, self.server.mask_list(u), self._upload_stream)
            stage, finite, clamped = "masked_input", encoder.finite, encoder.clamped
        else:
            enc = codec.encode(x, float(weight), aux, key)
            payload, stage, finite, clamped = enc.ints, "encode", enc.finite, enc.clamped
        with self._lock:
            self._secs[stage] += time.perf_counter() - t0
        if not finite:
            return Upload(u, excluded="nonfinite")
        probe = None
        if self.config.measure_quant_error:  # an evenly spaced sample of coordinates (cheap for any dim)
            probe = x[:: self._probe_stride(ctx.dim)].astype(np.float64)
            if clamped:
                np.clip(probe, -codec.value_bound, codec.value_bound, out=probe)
        return Upload(u, payload, diagnostic=probe)

    def receive(self, upload: Upload) -> None:
        """The server's side: check the sender, then add its masked vector (simulate: its encoding)."""
        if self.ctx is None:
            raise AggregationFailed("SecureAggregator.receive called before begin()")
        u, rnd = upload.device_id, self.ctx.round
        if u not in self._cohort_set:
            raise AggregationFailed(f"device {u} is not in the cohort of round {rnd}")
        if u in self._seen:
            raise AggregationFailed(f"device {u} sent two updates in round {rnd}")
        if u in self._dropped:
            raise AggregationFailed(f"device {u} was dropped in round {rnd} and then sent an update")
        self._seen.add(u)
        if upload.excluded is not None:
            if upload.excluded in self._excluded:
                self._excluded[upload.excluded] += 1
            if upload.excluded in ("simulated_dropout", "nonfinite"):
                self._dropped.add(u)
            return
        t0 = time.perf_counter()
        if self.config.mode == "full":
            assert self.server is not None
            self.server.receive_masked(u, upload.payload)
            if self.config.keep_transcript:
                self.transcript["masked"][u] = upload.payload
        else:
            if self._acc is None:
                self._acc = np.zeros(upload.payload.size, dtype=word_dtype(self.config.bits))
            if upload.payload.shape != self._acc.shape:
                raise AggregationFailed(f"device {u} sent {upload.payload.size} words, expected {self._acc.size}")
            np.add(self._acc, upload.payload, out=self._acc)
        self._secs["sum"] += time.perf_counter() - t0
        self._contributed.add(u)
        if upload.diagnostic is not None:
            if self._float_sum is None:
                self._float_sum = np.zeros(upload.diagnostic.size, dtype=np.float64)
            self._float_sum += upload.diagnostic

    @staticmethod
    def _probe_stride(dim: int) -> int:
        return max(1, -(-dim // QUANT_PROBES))

    def drop(self, device_id: int) -> None:
        """Mark a dropout; a device whose masked input already arrived stays in the sum."""
        if int(device_id) not in self._contributed:
            self._dropped.add(int(device_id))

    # ---------------------------------------------------------------- finalize: Unmasking + decoding
    def finalize(self) -> AggregateResult:
        if self.ctx is None:
            raise AggregationFailed("SecureAggregator.finalize called before begin()")
        if self._failure is not None:
            raise AggregationFailed(f"secure aggregation of round {self.ctx.round} failed safely: {self._failure}")
        u3 = set(self._contributed)
        if not u3 or self.codec is None:
            raise AggregationFailed("no device contributed an update this round")
        responders = {v for v in u3 if self.plan.get(v) != "unmask"}
        problem = recovery_problem(self.graph, self.u2, u3, responders, self.threshold)
        if problem:
            raise AggregationFailed(f"secure aggregation of round {self.ctx.round} failed safely: {problem}")
        bad_shares = 0
        if self.config.mode == "full":
            total = self._finalize_full(responders)
            assert self.server is not None
            bad_shares = self.server.bad_shares
        else:
            assert self._acc is not None
            total = self.session.reduce(self._acc.copy())
        self.last_sum = total
        dec = self.codec.decode(total)
        metrics = self._metrics(dec.clamped, len(u3), bad_shares, dec.update)
        self.clients = {}  # the round is over: drop the simulated devices' secrets
        total_f32 = torch.from_numpy(dec.update.astype(np.float32))
        return AggregateResult(total_f32, dec.weight, len(u3), dec.aux, metrics)

    def _finalize_full(self, responders: set[int]) -> np.ndarray:
        assert self.server is not None
        t0 = time.perf_counter()
        responses = {}
        for v in sorted(responders):
            request = self.server.unmask_request(v)
            responses[v] = self.clients[v].unmask(*request)
            if self.config.keep_transcript:
                self.transcript["requests"][v] = request
                self.transcript["responses"][v] = responses[v]
        t1 = time.perf_counter()
        total = self.server.finish(responses, self._stream)
        self._secs["unmask_clients"], self._secs["unmask_server"] = t1 - t0, time.perf_counter() - t1
        return total

    def _metrics(self, clamped: int, contributors: int, bad_shares: int, decoded: np.ndarray) -> dict[str, float]:
        assert self.codec is not None
        m: dict[str, float] = {
            "secagg_wraps": float(clamped),
            "secagg_quant_step": 1.0 / self.codec.value_scale,
            "secagg_rounding_slack": self.codec.rounding_slack(),  # norm reserved per device for rounding
            "secagg_quant_error_bound": self.codec.quant_error_bound(contributors),
            "secagg_survivors": float(contributors),
            "secagg_key_sharing": float(len(self.u2)),
            "secagg_dropped_after_sharing": float(len(self.u2) - contributors),
            "secagg_degree": float(self.degree),
            "secagg_threshold": float(self.threshold),
            "secagg_bad_shares": float(bad_shares),
        }
        m.update({f"secagg_excluded_{k}": float(v) for k, v in self._excluded.items()})
        m.update({f"secagg_seconds_{k}": v for k, v in self._secs.items()})
        if self.config.mode == "full":
            sent = [c.bytes_sent for c in self.clients.values() if c.device_id in self._contributed]
            m["secagg_bytes_per_device_mean"] = float(np.mean(sent))
            m["secagg_bytes_per_device_max"] = float(np.max(sent))
        else:
            estimate = upload_bytes_estimate(self.degree, self.codec.length, self.config.bits)
            m["secagg_bytes_per_device_mean"] = float(estimate)  # what the full protocol would send
        if self._float_sum is not None:
            probe = decoded[:: self._probe_stride(decoded.size)]
            m["secagg_quant_error_max"] = float(np.max(np.abs(probe - self._float_sum)))
        return m
