"""The device's distributed-DP encoding into Z_2^w and the server's decoding; `SecureAggregator` calls it.

Device (`encode`): clipped update x (‖x‖ ≤ C) → public rotation R (pad to D) → ×γ → conditional randomised rounding
(‖x̃‖₂ ≤ Δ₂) → + its own noise share z (Skellam or discrete Gaussian, from its secret key) → (x̃ + z) mod 2^w,
followed by the usual fixed-point tail [weight | aux | clamp counter]. No clamping: the integers wrap modulo 2^w,
so the revealed sum is exactly (Σ x̃_v + Σ z_v) mod 2^w — post-processing of the mechanism the accountant charges.
Server (`decode`): reduce the sum mod 2^m (m = the mechanism's modulus bits, ≤ w: exact post-processing), centre
it into [−2^(m−1), 2^(m−1)), divide by γ, rotate back. The server never adds noise and never sees Σ x̃_v alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pflm.aggregator.secagg.fixed_point import Decoded, Encoded, FixedPointCodec
from pflm.aggregator.secagg.masking import word_dtype
from pflm.privacy.distributed.discrete import conditional_rounding, device_generator, discrete_gaussian, skellam
from pflm.privacy.distributed.rotation import Rotation
from pflm.secure_random import subkey

NORM_TOLERANCE = 1e-6  # relative slack on ‖x‖ ≤ C (float32 clipping); absorbed by Δ₂'s rounding margin below


@dataclass(frozen=True)
class CodecScale:
    """One round's integer-domain parameters for the devices of this (simulated) cohort."""

    mechanism: str
    gamma: float  # integer units per unit of update
    l2: float  # public bound on ‖x̃‖₂ enforced by conditional rounding
    share_variance: float  # variance of one device's noise share (integer units)
    modulus_bits: int  # m: the sum is reduced mod 2^m before decoding


class DistributedDPCodec:
    """Duck-types the parts of `FixedPointCodec` the secure aggregator uses (length, encode, decode, metrics)."""

    fused = False  # the aggregator calls `encode` and masks the finished integers (no chunk-wise fusion)

    def __init__(self, scale: CodecScale, rotation: Rotation, tail: FixedPointCodec, clip_bound: float) -> None:
        if tail.dim != 0:
            raise ValueError("the tail codec encodes only weight and aux values (dim 0)")
        if scale.modulus_bits > tail.bits:
            raise ValueError("the mechanism's modulus exceeds the secure sum's word")
        self.scale, self.rotation, self.tail = scale, rotation, tail
        self.clip_bound = float(clip_bound)
        self.dim, self.bits, self.aux_keys = rotation.dim, tail.bits, tail.aux_keys
        self.rotated = rotation.padded
        self.length = self.rotated + tail.length
        self.value_scale = scale.gamma
        self.value_bound = self.clip_bound
        self.last_tries = 0  # conditional-rounding tries of the last encode (tests)

    # -- what a remote device is told (pflm.flower.secure_node) ------------------------------------------------
    def public_params(self) -> dict:
        """Every parameter a device needs to encode, all public: the mechanism, γ, the rounding bound Δ₂, one
        device's share variance, the modulus, the tail layout and the rotation block. The rotation itself is
        public by design (Kairouz et al. 2021 §4.2; Agarwal et al. 2021): the device derives it from the run's
        public seed and the round (`rotation_seed`), see rotation.py for why it need not be secret."""
        s, t = self.scale, self.tail
        return {"kind": "distributed", "mechanism": s.mechanism, "gamma": s.gamma, "l2": s.l2,
                "share_variance": s.share_variance, "modulus_bits": s.modulus_bits, "bits": self.bits,
                "n": t.cohort_size, "dim": self.dim, "rotation_block": self.rotation.block,
                "clip_bound": self.clip_bound, "weight_bound": t.weight_bound, "aux_keys": list(t.aux_keys),
                "aux_bound": t.aux_bound, "aux_bounds": list(t.aux_bound_list)}

    @classmethod
    def from_public(cls, p: dict, rotation_seed: bytes) -> DistributedDPCodec:
        """The device's codec from `public_params` (values the node has already checked) and the public seed."""
        scale = CodecScale(str(p["mechanism"]), float(p["gamma"]), float(p["l2"]), float(p["share_variance"]),
                           int(p["modulus_bits"]))
        return codec_for_round(scale, int(p["dim"]), rotation_seed, int(p["rotation_block"]), int(p["bits"]),
                               int(p["n"]), tuple(p["aux_keys"]), float(p["weight_bound"]), float(p["aux_bound"]),
                               float(p["clip_bound"]), aux_bounds=tuple(float(b) for b in p["aux_bounds"]))

    # -- metrics the aggregator reports ----------------------------------------------------------------------
    def rounding_slack(self) -> float:
        return 0.0  # conditional rounding keeps ‖x̃‖ ≤ Δ₂, which the accountant uses: nothing to shrink

    def shrink_factor(self, update: np.ndarray, bound: float) -> float:
        return 1.0

    def quant_error_bound(self, contributors: int) -> float:
        return contributors / self.scale.gamma

    # -- device side -------------------------------------------------------------------------------------------
    def noise_share(self, key: bytes) -> np.ndarray:
        """This device's noise share (int64, length D) from its secret key."""
        gen = device_generator(subkey(key, "ddp-noise"))
        s = self.scale
        if s.mechanism == "distributed_skellam":
            return skellam(gen, s.share_variance / 2.0, self.rotated)
        return discrete_gaussian(gen, s.share_variance, self.rotated)

    def quantise(self, update: np.ndarray, key: bytes) -> np.ndarray:
        """x̃ = conditional rounding of γ·R·x (int64, length D)."""
        x = np.asarray(update, dtype=np.float64)
        norm = float(np.linalg.norm(x))
        if norm > self.clip_bound * (1 + NORM_TOLERANCE):
            raise ValueError(f"update norm {norm:.6g} exceeds the clip bound {self.clip_bound:.6g}")
        y = self.rotation.forward(x)
        y *= self.scale.gamma
        r, self.last_tries = conditional_rounding(device_generator(subkey(key, "ddp-rounding")), y, self.scale.l2)
        return r

    def encode(self, update: np.ndarray, weight: float, aux: dict[str, float], key: bytes,
               scale: float = 1.0) -> Encoded:
        """The device's integers in Z_2^w: [(x̃ + z) mod 2^w | fixed-point weight, aux, counter]."""
        if not np.all(np.isfinite(update)):
            return Encoded(np.zeros(self.length, dtype=word_dtype(self.bits)), 0, finite=False)
        v = self.quantise(update, key) + self.noise_share(key)
        tail = self.tail.encode(np.zeros(0, dtype=np.float32), weight, aux, subkey(key, "ddp-tail"))
        ints = np.empty(self.length, dtype=word_dtype(self.bits))
        mask = (1 << self.bits) - 1
        ints[: self.rotated] = (v & mask).astype(ints.dtype)  # two's complement: v mod 2^w
        ints[self.rotated :] = tail.ints
        return Encoded(ints, tail.clamped, tail.finite)

    # -- server side -------------------------------------------------------------------------------------------
    def centred(self, total: np.ndarray) -> np.ndarray:
        """The revealed sum's rotated part reduced mod 2^m and centred: Σ x̃ + Σ z unless a coordinate wrapped."""
        m = self.scale.modulus_bits
        v = total[: self.rotated].astype(np.int64) & ((1 << m) - 1)
        v[v >= (1 << (m - 1))] -= 1 << m
        return v

    def decode(self, total: np.ndarray) -> Decoded:
        v = self.centred(total).astype(np.float64) / self.scale.gamma
        tail = self.tail.decode(total[self.rotated :])
        return Decoded(self.rotation.inverse(v), tail.weight, tail.aux, tail.clamped)


def codec_for_round(scale: CodecScale, dim: int, rotation_seed: bytes, block: int, bits: int, cohort: int,
                    aux_keys: tuple[str, ...], max_weight: float, aux_bound: float, clip_bound: float,
                    rotation_cache: dict | None = None, aux_bounds: tuple[float, ...] = ()) -> DistributedDPCodec:
    """The round's codec; `rotation_cache` keeps one Rotation per (dim, seed) (it is public and shared);
    `aux_bounds`: per-key bounds of the tail's aux values (empty: `aux_bound` for every key)."""
    key = (dim, rotation_seed, block)
    rot = None if rotation_cache is None else rotation_cache.get(key)
    if rot is None:
        rot = Rotation(dim, rotation_seed, block)
        if rotation_cache is not None:
            rotation_cache.clear()
            rotation_cache[key] = rot
    tail = FixedPointCodec(bits, cohort, 0, 1.0, max_weight, tuple(aux_keys), aux_bound, 1, tuple(aux_bounds))
    return DistributedDPCodec(scale, rot, tail, clip_bound)


def modulus_bits(bits: float) -> int:
    return int(math.ceil(bits - 1e-9))
