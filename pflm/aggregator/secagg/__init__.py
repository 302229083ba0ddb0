"""Secure aggregation (Bonawitz et al. CCS 2017; SecAgg+, Bell et al. CCS 2020): the server learns only sums.

Protocol (per round, cohort of n devices, neighbour graph of degree k, threshold t; the device half is
`client.SecAggClient`, the server half `protocol.SecAggServer`, the wire messages `messages`):

0. AdvertiseKeys — each device checks the round's public parameters (cohort, degree k, threshold t, bits)
   against its own `SecAggConfig` floors (k ≥ its floor, t ≥ ⌈threshold·k⌉ and t > k/2, or > 2k/3 with
   `malicious`), makes two X25519 key pairs (c: share encryption, s: mask agreement) and a 32-byte self-mask
   seed b_u, and publishes (c_pk, s_pk, SHA-256 commitment to b_u) — Ed25519-signed under the device key
   registry in the malicious variant.
1. ShareKeys — the graph seed is SHA-256(session, round, every advertised key sorted by id): each device
   recomputes the graph and refuses a neighbour list that differs. t-of-k Shamir shares (field 2^521 − 1) of b_u
   and s_sk go to each live neighbour under ChaCha20-Poly1305 with a key HKDF-derived from X25519(c_sk_u, c_pk_v)
   and a nonce unique per (session, sender, receiver, purpose); the associated data binds session, sender,
   receiver and the public share tags (hashes of the two shares). Receivers decrypt at once and complain about
   bad messages; a device left with < t valid holders leaves U2 before anyone masks with it.
2. MaskedInputCollection — y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ U2} ±PRG(s_uv) mod 2^b, with x_u the fixed-point
   encoding (`fixed_point`), s_uv = HKDF(X25519(s_sk_u, s_pk_v), session, round, min(u,v), max(u,v)), PRG =
   AES-128-CTR keystream, and + when u < v. A device refuses a mask list with < t neighbours or strangers.
   Survivors: U3. (Malicious variant: ConsistencyCheck — each survivor signs the U3 it is told.)
3. Unmasking — answered once per device: survivors and dropped must split exactly its mask list with ≥ t
   survivors (and, malicious variant, match the U3 it signed with ≥ t valid neighbour signatures on it); it
   reveals b-shares of surviving and s_sk-shares of dropped neighbours, never both for one device. The server
   checks every share against its public tag (a liar is dropped), reconstructs (checking b against its
   commitment and s_sk against s_pk), removes self-masks and the dropped devices' pairwise masks, decodes Σ x_u.

Threat model (docs/secagg.md has the per-backend table): the sum over U3 is all the server learns as long as
every honest device has fewer than t colluding neighbours (semi-honest server), or fewer than 2t − k (a server
that lies about dropouts); `params.secagg_parameters` picks k and t so that this holds except with probability
2^-failure_log2 for a γ-fraction of colluders. Without `malicious`, the key directory is trusted (a server that
fabricates devices' keys defeats any threshold); with it, keys are bound to the registry and survivors sign U3.
What leaks: the sum over U3 (update, weight, aux sums and the count of clamped coordinates), the sets
U1 ⊇ U2 ⊇ U3 (who dropped when), the public graph, and message sizes. Individual updates are protected only
computationally (X25519 / Ed25519 / AES-CTR / ChaCha20-Poly1305 / HKDF); the sum itself is released in the
clear (add DP noise on top). `mode="simulate"` runs no cryptography: only where the server is trusted.
"""

from typing import TYPE_CHECKING

from pflm.aggregator.secagg.client import ProtocolViolation, SecAggClient
from pflm.aggregator.secagg.options import SecAggConfig
from pflm.aggregator.secagg.messages import DeviceIdentity, DeviceRegistry
from pflm.aggregator.secagg.params import SecAggParameters, secagg_parameters

if TYPE_CHECKING:
    from pflm.aggregator.secagg.aggregator import SecureAggregator, make_secure_aggregator


def __getattr__(name: str):
    """`SecureAggregator` / `make_secure_aggregator` import torch: loaded on first use, so a device that only
    runs the protocol (a Flower ClientApp's key-exchange stages) starts without torch."""
    if name in ("SecureAggregator", "make_secure_aggregator"):
        from pflm.aggregator.secagg import aggregator

        return getattr(aggregator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DeviceIdentity",
    "DeviceRegistry",
    "ProtocolViolation",
    "SecAggClient",
    "SecAggConfig",
    "SecAggParameters",
    "SecureAggregator",
    "make_secure_aggregator",
    "secagg_parameters",
]
