"""Secure aggregation (Bonawitz et al. CCS 2017; SecAgg+, Bell et al. CCS 2020): the server learns only sums.

Protocol (per round, cohort of n devices, neighbour graph of degree k, threshold t = ⌈threshold·k⌉ ≥ 2):

0. AdvertiseKeys — each device makes two X25519 key pairs (c: share encryption, s: mask agreement), a 32-byte
   self-mask seed b_u, and publishes (c_pk, s_pk, SHA-256 commitment to b_u).
1. ShareKeys — t-of-k Shamir shares (field 2^521 − 1) of b_u and of s_sk, one ChaCha20-Poly1305 message per
   neighbour under a key HKDF-derived from X25519(c_sk_u, c_pk_v) and bound to (session, round, sender,
   receiver). Devices that did not share (or keep < t live neighbours) leave the round: U2.
2. MaskedInputCollection — y_u = x_u + PRG(b_u) + Σ_{v ∈ N(u) ∩ U2} ±PRG(s_uv) mod 2^b, with x_u the fixed-point
   encoding (`fixed_point`), s_uv = HKDF(X25519(s_sk_u, s_pk_v), session, round, min(u,v), max(u,v)), PRG =
   AES-128-CTR keystream, and + when u < v. Survivors: U3.
3. Unmasking — each responding neighbour reveals its b-share of every survivor and its s_sk-share of every
   device in U2 \\ U3; the server reconstructs (checking b against its commitment and s_sk against s_pk),
   removes self-masks and the dropped devices' pairwise masks, and decodes Σ_{u∈U3} x_u.

Threat model: honest-but-curious server; semi-honest devices (they follow the protocol; up to t−1 of a device's
neighbours may pool what they hold with the server without learning its input); authenticated channels and an
honest key directory are assumed (no PKI/signatures: an actively malicious server could impersonate devices).
An honest device refuses to reveal both share kinds for one device, so the server never holds both b_u and
s_sk_u. What leaks: the sum over U3 (update, weight, aux sums and the count of clamped coordinates), the sets
U1 ⊇ U2 ⊇ U3 (who dropped when), the public graph, and message sizes. Individual updates are protected only
computationally (X25519 / AES-CTR / ChaCha20-Poly1305 / HKDF); the sum itself is released in the clear (add DP noise on top).
`mode="simulate"` runs no cryptography and must be used only where the server is trusted (fast sweeps).
"""

from pflm.aggregator.secagg.aggregator import SecureAggregator, make_secure_aggregator
from pflm.aggregator.secagg.config import SecAggConfig

__all__ = ["SecAggConfig", "SecureAggregator", "make_secure_aggregator"]
