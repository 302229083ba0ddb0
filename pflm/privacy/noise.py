"""Gaussian noise for central DP from a cryptographically secure generator (ChaCha20 keystream + Box–Muller).

Why not torch/numpy RNGs: their state is small and predictable, so anyone who learns it can subtract the
noise. Here every draw comes from a ChaCha20 keystream keyed by HKDF-SHA256(run key, purpose) with the
nonce bound to the round index, so each (round, purpose) stream is independent of how much noise was
drawn before: a resumed run reproduces exactly the noise an uninterrupted run would add.

Known limitation: the Gaussian is computed in float64 floating point (Box–Muller); like most DP libraries
we do not defend against floating-point side channels (Mironov 2012); a discrete Gaussian would.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Sequence

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pflm.aggregator.base import AggregateResult, RoundContext
from pflm.errors import ConfigError
from pflm.privacy.base import Postprocessor

KEY_BYTES = 32
_PAIRS_PER_CHUNK = 1 << 20  # 16 MiB of keystream per chunk bounds peak memory for huge release vectors
_TWO_PI = 2.0 * math.pi
_INV_2_53 = 1.0 / (1 << 53)
_MASK_53 = (1 << 53) - 1


def _hkdf(material: bytes, info: bytes, salt: bytes = b"pflm-privacy-noise-v1") -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=salt, info=info).derive(material)


def derive_key(seed: int | None) -> bytes:
    """Run key for the noise generator: HKDF of the seed (reproducible simulation) or 32 fresh OS bytes.

    A seeded key is only as secret as the seed: use seed=None for any deployment that needs real privacy.
    """
    if seed is None:
        return os.urandom(KEY_BYTES)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"noise seed {seed!r} is not an integer: give an int or None for a random key")
    return _hkdf(str(seed).encode("ascii"), b"pflm run key")


class SecureGaussian:
    """Standard-normal draws from ChaCha20; stream (round, purpose) is a pure function of the run key."""

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
            raise ConfigError(f"noise key must be {KEY_BYTES} bytes: use derive_key(seed)")
        self._key = bytes(key)
        self._subkeys: dict[str, bytes] = {}

    def _encryptor(self, round: int, purpose: str):  # noqa: A002 - "round" is the domain term
        if isinstance(round, bool) or not isinstance(round, int) or not 0 <= round < 1 << 64:
            raise ConfigError(f"round {round!r} is invalid for the noise stream: use an int in [0, 2^64)")
        if purpose not in self._subkeys:
            self._subkeys[purpose] = _hkdf(self._key, b"pflm gaussian stream/" + purpose.encode("utf-8"))
        # 16-byte ChaCha20 IV = block counter (little-endian, starts at 0) + nonce. Zeros in the first 8 bytes
        # and the round in the last 8 make it valid for both the 32/96 and the 64/64 counter/nonce splits.
        nonce = bytes(8) + round.to_bytes(8, "little")
        return Cipher(algorithms.ChaCha20(self._subkeys[purpose], nonce), mode=None).encryptor()

    def standard_normal(self, round: int, n: int, purpose: str = "update") -> torch.Tensor:  # noqa: A002
        """`n` i.i.d. N(0, 1) float64 values for stream (round, purpose)."""
        n = int(n)
        pairs = (n + 1) // 2
        z = torch.empty((pairs, 2), dtype=torch.float64)
        if n == 0:
            return z.reshape(-1)
        enc = self._encryptor(round, purpose)
        done = 0
        while done < pairs:
            k = min(_PAIRS_PER_CHUNK, pairs - done)
            # The keystream is read as little-endian 64-bit words on every platform.
            raw = np.frombuffer(bytearray(enc.update(bytes(16 * k))), dtype="<i8").astype(np.int64, copy=False)
            words = torch.from_numpy(raw).view(k, 2)
            # Top 53 bits of each word (mask undoes the sign extension of >>): u1 in (0, 1], u2 in [0, 1).
            u1 = ((words[:, 0] >> 11) & _MASK_53).to(torch.float64).add_(1.0).mul_(_INV_2_53)
            theta = ((words[:, 1] >> 11) & _MASK_53).to(torch.float64).mul_(_TWO_PI * _INV_2_53)
            r = u1.log_().mul_(-2.0).sqrt_()
            torch.mul(r, torch.cos(theta), out=z[done : done + k, 0])
            torch.mul(r, theta.sin_(), out=z[done : done + k, 1])
            done += k
        return z.reshape(-1)[:n]

    def normal(
        self,
        round: int,  # noqa: A002
        shape: int | Sequence[int] | torch.Size,
        std: float,
        purpose: str = "update",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """N(0, std²) tensor of `shape`; the same (key, round, purpose, shape) always gives the same values.

        Each (round, purpose) stream must be used once per round: draw all noise of one kind in one call.
        """
        if not std >= 0 or math.isinf(std):
            raise ConfigError(f"noise std {std} is invalid: use a finite value ≥ 0")
        size = torch.Size([shape]) if isinstance(shape, int) else torch.Size(shape)
        z = self.standard_normal(round, size.numel(), purpose)
        if std != 1.0:
            z.mul_(float(std))
        return z.reshape(size).to(dtype)


class GaussianNoisePostprocessor(Postprocessor):
    """Server side: add N(0, (σ·C·m/M)²) to every coordinate of the sum of the m clipped updates.

    σ is the noise multiplier, C the round's clip bound (`ctx.clip_bound`), m = len(ctx.cohort) the
    sampled cohort and M the *noise cohort* (default m). A real deployment with M users per round adds
    noise of std σ·C to their sum (sensitivity C), so their average has noise std σ·C/M. A simulation that
    trains on only m < M users scales the noise on its sum by m/M, so the average over its m users has the
    same noise std σ·C/M as the deployment's average (pfl-research's StackOverflow benchmark: m = 400
    simulated, M = 5,000, population 1e6). The ε then refers to cohort M, not m: account with q = M/N.
    σ = 0 leaves the aggregate untouched.
    """

    def __init__(
        self,
        noise_multiplier: float,
        generator: SecureGaussian,
        noise_cohort: int | None = None,
        purpose: str = "update",
    ) -> None:
        if not noise_multiplier >= 0 or math.isinf(noise_multiplier):
            raise ConfigError(f"noise_multiplier={noise_multiplier} is invalid: use a finite σ ≥ 0")
        if noise_cohort is not None and (isinstance(noise_cohort, bool) or int(noise_cohort) < 1):
            raise ConfigError(f"noise_cohort={noise_cohort} is invalid: use a positive user count or None")
        self.noise_multiplier = float(noise_multiplier)
        self.generator = generator
        self.noise_cohort = None if noise_cohort is None else int(noise_cohort)
        self.purpose = purpose

    def noise_std_on_sum(self, ctx: RoundContext) -> float:
        m = len(ctx.cohort)
        if m == 0:
            raise ConfigError("round has an empty cohort: sample at least one device before adding noise")
        big_m = self.noise_cohort or m
        return self.noise_multiplier * float(ctx.clip_bound) * m / big_m

    def on_server(self, agg: AggregateResult, ctx: RoundContext) -> tuple[AggregateResult, dict[str, float]]:
        if self.noise_multiplier == 0:
            return agg, {"noise_std_sum": 0.0, "noise_std_mean": 0.0}
        if math.isinf(ctx.clip_bound):
            raise ConfigError("Gaussian noise needs a finite clip bound: set clip_bound or noise_multiplier=0")
        std = self.noise_std_on_sum(ctx)
        noise = self.generator.normal(ctx.round, agg.total.shape, std, self.purpose, dtype=torch.float64)
        total = (agg.total.to(torch.float64) + noise).to(agg.total.dtype)
        m = len(ctx.cohort)
        metrics = {
            "noise_std_sum": std,
            "noise_std_mean": std / m,  # = σ·C/M: noise std per coordinate of the uniform average
            "noise_norm_mean": std / m * math.sqrt(agg.total.numel()),
        }
        return replace(agg, total=total), metrics
