"""The node's side of distributed DP: check the server's public mechanism parameters against the node's policy.

A Flower ServerApp tells the devices how to encode (`RemoteSecureAggregator.codec_params`). With distributed DP
(`kind: distributed`) that includes the noise share each device adds from its own key — so a malicious server
could ask for a zero share, or shrink the shares by lying about the dropout tolerance or the deployment size (the
devices cannot check the server's ε). The node therefore checks what it CAN check from values it trusts: the
session's cohort size n and threshold t (already held to the node's SecAgg floors by `SecAggClient`), its own
corrupt-device assumption and the round's clip bound. Refused (`refusal` returns why, every device of the node
leaves the round, and nothing it holds is sent):
- a mechanism the policy does not allow, a non-positive or non-finite share, γ or Δ₂; Δ₂ < γC (rounding could
  never succeed), a modulus above the session's word, parameters for another cohort, dimension or clip bound;
- seeded (public) rounding keys (`aggregation.secagg.rounding=seeded` in the node's policy): the share would be
  public;
- noise below the floor: in the smallest sum the server can unmask — t devices for the complete graph; for the
  SecAgg+ graph, the fraction t/k of n (Bell et al.'s guarantee is of this form; stated as an approximation) —
  at least ⌈corrupt_fraction·n⌉ may add nothing, so the honest shares give std √(h·v) with h = that minimum −
  ⌈c·n⌉; the devices require √(h·v)/Δ₂ ≥ `min_noise_multiplier`;
- a modulus 2^m whose half holds fewer than `min_range_stddevs` standard deviations of a coordinate of the sum
  (√(n²γ²C²/D + n/4 + n·v)): wrap-around would be near-certain.
The rotation seed is not taken from the server: the device derives it from the run's public seed and the round
(`rotation_seed`); it is public by design (rotation.py). On the wire a device sends only the low m bits of its masked
rotated coordinates, bit-packed (`pack_masked`): D·m bits, not D·w.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from pflm.aggregator.secagg.masking import Session
from pflm.aggregator.secagg.options import SecAggConfig
from pflm.flower.policy import DistributedPolicy

if TYPE_CHECKING:  # the privacy modules (and, through secure_random, torch) load only for a distributed round:
    from pflm.privacy.distributed.codec import DistributedDPCodec  # a warm-worker node never imports torch otherwise


def honest_shares(session: Session, config: SecAggConfig) -> int:
    """h: honest devices whose shares are in any sum the session lets the server unmask (see module docstring)."""
    from pflm.privacy.distributed import params

    return params.honest_shares(len(session.x_of), session.degree, session.threshold, config.corrupt_fraction)


def node_noise_multiplier(cp: dict[str, Any], session: Session, config: SecAggConfig) -> float:
    """√(h·v)/Δ₂: the noise multiplier the honest shares alone guarantee in any unmaskable sum (0 if h < 1)."""
    from pflm.privacy.distributed import params

    return params.honest_noise_multiplier(honest_shares(session, config), float(cp["share_variance"]), float(cp["l2"]))


def range_stddevs(cp: dict[str, Any]) -> float:
    """Half the modulus over the std of one coordinate of the sum (signal spread, rounding, every share)."""
    from pflm.privacy.distributed.rotation import padded_length

    n, g, c, v = int(cp["n"]), float(cp["gamma"]), float(cp["clip_bound"]), float(cp["share_variance"])
    d, _ = padded_length(int(cp["dim"]), int(cp["rotation_block"]))
    return 2.0 ** (int(cp["modulus_bits"]) - 1) / math.sqrt(n * n * g * g * c * c / d + n / 4.0 + n * v)


def refusal(cp: dict[str, Any], policy: DistributedPolicy, session: Session, config: SecAggConfig,
            clip_bound: float, dim: int) -> str | None:
    """Why the node's devices refuse to encode with `cp` (None: they accept)."""
    if cp.get("kind") != "distributed":
        if policy.required:
            return ("the node's policy requires distributed DP (devices add their own noise) and the server asks "
                    "for a plain fixed-point sum, which it would see without noise")
        return None
    try:
        mech, g, l2, v = str(cp["mechanism"]), float(cp["gamma"]), float(cp["l2"]), float(cp["share_variance"])
        m, bits, n, d = int(cp["modulus_bits"]), int(cp["bits"]), int(cp["n"]), int(cp["dim"])
        c, block = float(cp["clip_bound"]), int(cp["rotation_block"])
    except (KeyError, TypeError, ValueError):
        return "the distributed-DP parameters are malformed"
    if mech not in policy.mechanisms:
        return f"mechanism {mech} is not allowed by the node's policy ({policy.mechanisms})"
    if config.rounding == "seeded":
        return "distributed DP needs secret device keys and the node's policy uses seeded (public) rounding"
    if not all(math.isfinite(x) and x > 0 for x in (g, l2, v)):
        return f"noise share variance {v:g}, γ {g:g} and Δ₂ {l2:g} must be positive and finite (a zero share is refused)"
    if bits != session.bits or n != len(session.x_of) or d != dim:
        return "the codec does not match the session (bits, cohort size, dimension)"
    if abs(c - clip_bound) > 1e-9 * clip_bound:
        return f"the codec's clip bound {c:g} differs from the round's {clip_bound:g}"
    if not 1 <= m <= bits or block < 1 or block & (block - 1):
        return f"modulus 2^{m} or rotation block {block} is invalid for {bits}-bit words"
    if l2 < g * c:
        return f"Δ₂ = {l2:g} is below γC = {g * c:g}: conditional rounding could never succeed"
    z = node_noise_multiplier(cp, session, config)
    if z < policy.min_noise_multiplier:
        return (f"the honest shares give noise multiplier {z:.4g} in the smallest unmaskable sum "
                f"({honest_shares(session, config)} honest devices × share variance {v:.4g}, Δ₂ = {l2:.4g}), below "
                f"the node's floor {policy.min_noise_multiplier:g}")
    k = range_stddevs(cp)
    if k < policy.min_range_stddevs:
        return (f"a {m}-bit modulus holds only {k:.3g} standard deviations of the sum (node floor "
                f"{policy.min_range_stddevs:g}): wrap-around would be near-certain")
    return None


def device_codec(cp: dict[str, Any], seed: int, round_idx: int) -> DistributedDPCodec:
    """The checked codec; its rotation comes from the public (seed, round), never from the server's message."""
    from pflm.privacy.distributed.codec import DistributedDPCodec
    from pflm.privacy.distributed.rotation import rotation_seed

    return DistributedDPCodec.from_public(cp, rotation_seed(seed, round_idx))


# ------------------------------------------------------------------------------------------ the packed wire format
def pack_masked(y: np.ndarray, rotated: int, m: int) -> np.ndarray:
    """A distributed round's masked vector as sent: the rotated part's low m bits, bit-packed (⌈rotated·m/8⌉
    bytes), then the tail words whole. Only Σ mod 2^m of the rotated part is ever decoded, and reduction mod 2^m
    commutes with the masking (2^m divides the word modulus 2^w), so the high bits carry nothing the server needs:
    this is what makes the payload D·m bits instead of D·w."""
    w = y.dtype.itemsize
    bits = np.unpackbits(np.ascontiguousarray(y[:rotated], dtype=f"<u{w}").view(np.uint8).reshape(rotated, w),
                         axis=1, bitorder="little")[:, :m]
    return np.concatenate([np.packbits(bits.reshape(-1), bitorder="little"),
                           np.ascontiguousarray(y[rotated:]).view(np.uint8)])


def unpack_masked(buf: np.ndarray, rotated: int, m: int, length: int, dtype: Any) -> np.ndarray | None:
    """The server's inverse of `pack_masked`: a word vector whose rotated part holds the low m bits (high bits 0);
    None when the buffer has the wrong size for the round's layout."""
    dtype = np.dtype(dtype)
    head = (rotated * m + 7) // 8
    if buf.dtype != np.uint8 or buf.ndim != 1 or buf.size != head + (length - rotated) * dtype.itemsize:
        return None
    words = np.zeros((rotated, 8 * dtype.itemsize), dtype=np.uint8)
    words[:, :m] = np.unpackbits(buf[:head], bitorder="little")[: rotated * m].reshape(rotated, m)
    out = np.zeros(length, dtype=dtype)
    out[:rotated] = np.packbits(words, axis=1, bitorder="little").view(f"<u{dtype.itemsize}").reshape(-1)
    out[rotated:] = buf[head:].view(dtype.newbyteorder("<")).astype(dtype)
    return out
