"""Parameter guidance for distributed DP (`pflm privacy calibrate|plan --mechanism distributed_*`).

For a deployment (cohort n of population N, rounds, δ, target ε, clip C, dimension d, b bits) it reports the
calibrated discrete mechanism next to the central Gaussian at the same ε: bits per coordinate, payload per device,
the chance that the modular sum wraps, the rounding's norm inflation, and the noise gap to central DP (std of the
sum's noise + rounding error when all n devices add their share, over the central σ·C).
"""

from __future__ import annotations

import math
from typing import Any

from pflm.privacy.accountant import calibrate_noise
from pflm.aggregator.secagg.options import SecAggConfig
from pflm.privacy.distributed.params import honest_noise_multiplier, honest_shares, plan_parameters
from pflm.privacy.distributed.rotation import DEFAULT_BLOCK, padded_length


def distributed_row(mechanism: str, bits: int, cohort: int, population: int, rounds: int, delta: float,
                    epsilon: float, clip: float, dim: int, dropout_tolerance: float = 0.05, k_stddevs: float = 4.0,
                    block: int = DEFAULT_BLOCK) -> dict[str, Any]:
    q = cohort / population
    padded, _ = padded_length(dim, block)
    P = plan_parameters(mechanism, bits, cohort, dropout_tolerance, clip, padded, q, rounds, delta,
                        target_epsilon=epsilon, k_stddevs=k_stddevs)
    central = calibrate_noise(q, rounds, delta, epsilon, "rdp")
    per_coord = min(1.0, 2 * math.exp(-k_stddevs**2 / 2))
    # what a Flower node computes its noise floor against: the smaller of the complete graph (t = 0.6·n) and the
    # strict node policy's SecAgg+ graph (Bell et al. t and degree for 5% colluders / 5% dropouts)
    honest = min(honest_shares(cohort, *sa.round_parameters(cohort), sa.corrupt_fraction)
                 for sa in (SecAggConfig(), SecAggConfig(neighbours="log")))
    return {
        "mechanism": mechanism, "bits": bits, "cohort": cohort, "rounds": rounds, "sampling_rate": q,
        "noise_multiplier": P.noise_multiplier, "central_noise_multiplier": central,
        "gamma": P.gamma, "rounding_inflation": P.rounding_inflation, "min_survivors": P.min_survivors,
        "share_variance": P.share_variance, "padded_dim": padded, "payload_bytes": P.payload_bytes(),
        "float32_bytes": 4 * dim, "wrap_prob_per_coord": per_coord, "wrap_log2_any": P.wrap_log2(),
        "noise_gap": P.sum_std() / (central * clip),
        "node_noise_multiplier": honest_noise_multiplier(honest, P.share_variance, P.l2), "node_honest_shares": honest,
    }


def describe(row: dict[str, Any]) -> list[str]:
    """Human-readable lines of one row (after the first `noise_multiplier:` line)."""
    return [
        f"mechanism: {row['mechanism']} (devices add the noise; the server adds none)",
        f"bits_per_coordinate: {row['bits']} (payload {row['payload_bytes']:,} bytes per device for "
        f"{row['padded_dim']:,} rotated values; float32 would be {row['float32_bytes']:,})",
        f"scale_gamma: {row['gamma']:.6g} (rounding inflates the sensitivity by {row['rounding_inflation'] - 1:.3%})",
        f"noise_share_variance: {row['share_variance']:.6g} per device; accounted for {row['min_survivors']} "
        f"surviving devices of {row['cohort']}",
        f"modular_clipping: ≤ {row['wrap_prob_per_coord']:.2e} per coordinate (sub-Gaussian bound, "
        f"log2 P[any] ≤ {row['wrap_log2_any']:.1f}; utility only, never privacy)",
        f"central_gaussian_noise_multiplier: {row['central_noise_multiplier']!r} (same ε, δ, q, rounds)",
        f"noise_gap_to_central: {row['noise_gap']:.4f}× the central noise std on the sum",
        f"node_noise_multiplier: {row['node_noise_multiplier']:.4f} (what a Flower node checks: {row['node_honest_shares']} "
        "honest shares in the smallest sum the default SecAgg graphs let the server unmask, over Δ₂; a node's "
        "policy.distributed.min_noise_multiplier must not exceed it)",
    ]
