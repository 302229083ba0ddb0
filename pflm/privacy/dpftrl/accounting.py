"""DP-FTRL accounting: the whole run is ONE Gaussian mechanism (no amplification by sampling is assumed).

Releasing x̂_t = x_t + σ·C_t·(C⁻¹z)_t for t < n is post-processing of C·(x/c) + σ·z, whose input changes by at
most sens_{k,b}(C) (per unit clip bound) when one user is added or removed, if that user joins ≤ k rounds at
least b apart (enforced by `pflm.server.participation`). That is a Gaussian mechanism with noise multiplier
σ / sens (Denisov et al. 2022 show it stays DP for adaptively chosen inputs, lower-triangular C). It is
accounted as one release at q = 1 by the run's accountant (Opacus RDP/PRV, or PLD) and composed with:
  * the adaptive-clipping counts: one Gaussian per round with std σ_b on Σ(b_i − ½) (sensitivity ½ per
    participation), i.e. ≤ k participations → one Gaussian with multiplier 2σ_b/√k, combined exactly with
    the update release (`combine_noise_multipliers`; the two worst cases are bounded separately, so the
    combination is an upper bound);
  * the DP vocabulary/prior release made by `pflm prepare` (its own history entry, as in `DPMechanism`).
ε after t < n rounds uses the sensitivity of the first t rows/columns (the released prefix).
"""

from __future__ import annotations

import math
from typing import Sequence

from pflm.errors import ConfigError
from pflm.privacy.accountant import calibrate_noise, combine_noise_multipliers, epsilon_from_history
from pflm.privacy.adaptive import update_noise_multiplier


def count_multiplier(count_noise_std: float | None, participations: int) -> float | None:
    """Noise multiplier of all adaptive-clipping count releases of one user together (None: no counts)."""
    if count_noise_std is None:
        return None
    return 2.0 * float(count_noise_std) / math.sqrt(max(participations, 1))


def effective_multiplier(sigma: float, sensitivity: float, count_mult: float | None = None) -> float:
    """σ_eff of the whole run as one Gaussian mechanism with unit sensitivity."""
    if not sensitivity > 0:
        raise ConfigError(f"strategy sensitivity {sensitivity} is invalid (must be > 0)")
    eff = float(sigma) / float(sensitivity)
    return eff if count_mult is None else combine_noise_multipliers([eff, count_mult])


def dpftrl_epsilon(sigma: float, sensitivity: float, delta: float, accountant: str = "rdp",
                   prefix: Sequence[tuple] = (), count_mult: float | None = None) -> float:
    """ε of the run's DP-FTRL release (noise multiplier σ on z, strategy sensitivity `sensitivity`)."""
    if sigma == 0:
        return math.inf
    eff = effective_multiplier(sigma, sensitivity, count_mult)
    return epsilon_from_history([*prefix, (eff, 1.0, 1)], delta, accountant)


def calibrate_dpftrl(target_epsilon: float, sensitivity: float, delta: float, accountant: str = "rdp",
                     prefix: Sequence[tuple] = (), count_mult: float | None = None) -> float:
    """Smallest σ (noise on z per unit clip) with ε ≤ target: σ_eff from the shared bisection (one release at
    q = 1), minus the count releases' share, times the sensitivity. ε(σ) ≤ target holds by construction."""
    total = calibrate_noise(1.0, 1, delta, target_epsilon, accountant, prefix)
    upd = total if count_mult is None else update_noise_multiplier(total, count_mult / 2.0)
    return upd * float(sensitivity)
