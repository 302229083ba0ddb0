"""`SecureAggregator`: the secure-aggregation protocol behind the streaming `Aggregator` interface.

`begin` runs AdvertiseKeys and ShareKeys for the cohort, `upload` runs the device's encoding and masking (the
same `SecAggClient` code a real device runs; thread-safe, so simulated devices can mask concurrently),
`receive` sums the masked vector on the server, `drop` marks a dropout, `finalize` runs Unmasking and decodes.
`mode="simulate"` skips the cryptography but draws the same dropouts and survivor sets on the same graph (and,
with `rounding="seeded"`, the same rounding), so its integer sum is then bit-identical to the full protocol's. The
full protocol's graph comes from the round's advertised keys; simulate uses a seeded stand-in (or, to replay a
full round, `ctx.extra["secagg_graph_seed"]`).

Before encoding, each device scales its update to norm ≤ clip_bound·weight − the codec's rounding slack
(`FixedPointCodec.shrink_factor`), so no rounding outcome can raise a contribution's norm above the clip bound the
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
from pflm.aggregator.secagg.client import SecAggClient
from pflm.aggregator.secagg.options import SecAggConfig
from pflm.aggregator.secagg.fixed_point import FixedPointCodec, rounding_key
from pflm.aggregator.secagg.graph import graph_seed, harary_graph
from pflm.aggregator.secagg.inprocess import InProcessProtocol, dropout_plan, upload_bytes_estimate
from pflm.aggregator.secagg.masking import MaskStream, Session, word_dtype
from pflm.aggregator.secagg.messages import DeviceIdentity, DeviceRegistry
from pflm.aggregator.secagg.params import SecAggParameters
from pflm.aggregator.secagg.protocol import SecAggServer, key_sharing_survivors, recovery_problem
from pflm.errors import AggregationFailed, NoContributions
from pflm.runtime import resolve_workers
from pflm.secure_random import subkey

QUANT_PROBES = 1 << 16  # coordinates compared with the float sum for secagg_quant_error_max (an even stride)


def make_secure_aggregator(options: SecAggConfig | dict[str, Any] | None, seed: int | None = None,
                           run_key: bytes | None = None) -> SecureAggregator:
    """The recipe's `aggregation: secure` aggregator (the typed `aggregation.secagg`, or a mapping of its options);
    `run_key`: the simulation's secret run key, which keys the (default, secret) stochastic rounding of uploads."""
    if isinstance(options, SecAggConfig):
        return SecureAggregator(options, seed, run_key)
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
        from pflm.schema import from_dict

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
        self.protocol: InProcessProtocol | None = None
        self.parameters: SecAggParameters | None = None  # the round's (k, t, γ, δ, failure bounds), after begin
        self.graph_seed: bytes | None = None
        # Malicious variant: the device key registry and the simulated devices' long-term identities (enrolment)
        self.registry = DeviceRegistry()
        self._identities: dict[int, DeviceIdentity] = {}
        self._contributed: set[int] = set()
        self._dropped: set[int] = set()
        # Distributed DP (pflm/privacy/distributed/codec.py): codec_factory(ctx, n, aux_keys, workers) builds the
        # round's device encoding (rotation, rounding, noise share) and its decoding, replacing FixedPointCodec.
        self.codec_factory: Any = None

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
        self._excluded = {"not_in_key_sharing": 0, "nonfinite": 0, "simulated_dropout": 0, "refused": 0, "malformed": 0}
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
        self.protocol = None
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
        if probe is not None and self.codec_factory is None:
            probe.check_slack(ctx.clip_bound)
        self.degree, self.threshold = cfg.round_parameters(n)
        self.parameters = cfg.parameters(n)
        self.session = Session(
            session_id=secrets.token_bytes(16),
            round=ctx.round,
            bits=cfg.bits,
            threshold=self.threshold,
            x_of={u: i + 1 for i, u in enumerate(cohort)},
            degree=self.degree,
            malicious=cfg.malicious,
        )
        if cfg.mode == "simulate":
            # No keys to hash: a trusted-server stand-in for the key-derived graph (the same uniform random ring),
            # from the public seed, or from ctx.extra["secagg_graph_seed"] to replay a full-protocol round's graph.
            self.graph_seed = ctx.extra.get("secagg_graph_seed") or hashlib.sha256(
                f"pflm-secagg-sim-graph|{self._seed}|{ctx.round}".encode()).digest()
            self.graph = harary_graph(cohort, self.degree, self.graph_seed)
            advertised = {u for u in cohort if self.plan.get(u) != "advertise"}
            sent = {
                u
                for u in advertised
                if self.plan.get(u) != "share" and len(self.graph[u] & advertised) >= self.threshold
            }
            self.u2 = key_sharing_survivors(self.graph, advertised, sent, self.threshold)
        else:
            self._begin_full()
            self.graph_seed = graph_seed(self.session.session_id, ctx.round,
                                         {u: ad.graph_key for u, ad in self.server.ads.items()})
        if len(self.u2) < self.threshold:
            self._failure = (
                f"only {len(self.u2)} of {n} devices completed key sharing, fewer than the threshold {self.threshold}"
            )

    def _begin_full(self) -> None:
        transcript = self.transcript if self.config.keep_transcript else None
        identities = {u: self._identity(u) for u in self.cohort} if self.config.malicious else None
        self.protocol = InProcessProtocol(self.session, self.config, self.plan, self.registry, identities, transcript)
        self.server = self.protocol.server
        self.u2 = self.protocol.begin()
        self.graph = self.protocol.graph
        self.clients = self.protocol.clients
        self._secs.update({k: self.protocol.secs[k] for k in ("advertise", "share")})

    def _identity(self, u: int) -> DeviceIdentity:
        """Enrolment: a device's long-term signing key, registered once per aggregator (its lifetime = the run's)."""
        if u not in self._identities:
            self._identities[u] = self.registry.enrol(u)
        return self._identities[u]

    # ---------------------------------------------------------------- add: device-side encoding + masking
    def _make_codec(self, aux: dict[str, float]) -> FixedPointCodec:
        assert self.ctx is not None
        cfg = self.config
        keys = tuple(cfg.aux_keys or self.ctx.extra.get("aux_keys") or sorted(aux))
        if self.codec_factory is not None:
            return self.codec_factory(self.ctx, len(self.cohort), keys, self._upload_workers())
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
        if u in self._seen:  # before the device is asked again (it would refuse and leave the round)
            raise AggregationFailed(f"device {u} sent two updates in round {ctx.round}")
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
        # The rounding must not raise the norm: encode f·x with ‖f·x‖ ≤ C·weight − slack (f applied inside the
        # encoder; the caller's tensor is untouched). With uniform weighting the decoded contribution has norm ≤ C.
        shrink = codec.shrink_factor(x, ctx.clip_bound * max(float(weight), 0.0))
        t0 = time.perf_counter()
        if self.config.rounding == "seeded":
            key = rounding_key(self._seed, ctx.round, u)  # public: reproducible, not secret
        elif self._rounding_secret is not None:
            key = subkey(self._rounding_secret, "upload", ctx.round, u)  # secret, reproducible with the run key
        else:
            key = rounding_key(None, ctx.round, u)  # fresh from the OS CSPRNG
        if self.config.mode == "full" and not getattr(codec, "fused", True):  # distributed DP: encode, then mask
            enc = codec.encode(x, float(weight), aux, key, shrink)
            payload = self.protocol.masked_input(u, enc.ints, self._upload_stream) if enc.finite else None
            if payload is None and enc.finite:
                return Upload(u, excluded="refused")
            stage, finite, clamped = "masked_input", enc.finite, enc.clamped
        elif self.config.mode == "full":
            assert self.server is not None
            encoder = codec.encoder(x, float(weight), aux, key, shrink)
            payload = self.protocol.masked_input(u, encoder, self._upload_stream)
            if payload is None:
                return Upload(u, excluded="refused")
            stage, finite, clamped = "masked_input", encoder.finite, encoder.clamped
        else:
            enc = codec.encode(x, float(weight), aux, key, shrink)
            payload, stage, finite, clamped = enc.ints, "encode", enc.finite, enc.clamped
        with self._lock:
            self._secs[stage] += time.perf_counter() - t0
        if not finite:
            return Upload(u, excluded="nonfinite")
        probe = None
        if self.config.measure_quant_error:  # an evenly spaced sample of coordinates (cheap for any dim)
            probe = x[:: self._probe_stride(ctx.dim)].astype(np.float64) * shrink
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
            if upload.excluded in ("simulated_dropout", "nonfinite", "refused"):
                self._dropped.add(u)
            return
        t0 = time.perf_counter()
        if self.config.mode == "full":
            assert self.server is not None
            if not self.server.receive_masked(u, upload.payload):
                self._dropped.add(u)
                self._excluded["malformed"] += 1
                return
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
    @property
    def nobody_contributed(self) -> bool:
        """An empty sum — nobody was sampled, or no masked input arrived in a round that did not fail — which a
        central-DP run still releases (NoContributions), unlike a protocol failure."""
        return not self.cohort or (self._failure is None and not self._contributed)

    def finalize(self) -> AggregateResult:
        if self.ctx is None:
            raise AggregationFailed("SecureAggregator.finalize called before begin()")
        if self.nobody_contributed:
            raise NoContributions("no device contributed an update this round")
        if self._failure is not None:
            raise AggregationFailed(f"secure aggregation of round {self.ctx.round} failed safely: {self._failure}")
        u3 = set(self._contributed)
        responders = {v for v in u3 if self.plan.get(v) != "unmask"}
        complaints = self.server.complaints if self.server is not None else None
        problem = recovery_problem(self.graph, self.u2, u3, responders, self.threshold, complaints)
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
        total = self.protocol.finalize(responders, self._stream)
        self._secs.update({k: self.protocol.secs[k] for k in ("unmask_clients", "unmask_server")})
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
            "secagg_misbehaving": float(len(self.server.misbehaving) if self.server is not None else 0),
            "secagg_refusals": float(len(self.protocol.refusals) if self.protocol is not None else 0),
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
