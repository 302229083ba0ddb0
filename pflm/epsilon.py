"""ε of a history of Poisson-subsampled Gaussian releases (Opacus RDP/PRV, dp-accounting PLD): the one place
pflm asks an accountant for ε. Shared by the user-level accountant (`pflm.privacy.accountant`) and the device's
sample-level DP-SGD report (`pflm.device.dpsgd`), so both stages agree by construction.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from opacus.accountants import PRVAccountant, RDPAccountant

from pflm.errors import ConfigError

ACCOUNTANTS = ("rdp", "prv", "pld")
PRV_EPS_ERROR = 0.01  # Opacus' default absolute ε error for PRV; the value returned is the upper bound
PLD_DISCRETIZATION = 1e-3  # dp-accounting PLD grid; pessimistic estimate, so coarser is still an upper bound



def pld_available() -> bool:
    """True when the optional `dp-accounting` package (for accountant="pld") is importable."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        return False
    return True


def check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise ConfigError(f"unknown accountant {name!r}: use one of {', '.join(ACCOUNTANTS)}")
    if name == "pld" and not pld_available():
        raise ConfigError(
            "accountant 'pld' needs the dp-accounting package: pip install 'dp-accounting>=0.6,<0.7' "
            "(or use --accountant rdp|prv)"
        )
    return name


def _check_rate(q: float) -> float:
    q = float(q)
    if not 0 <= q <= 1:
        raise ConfigError(f"sampling rate q={q:g} is outside [0, 1]: the cohort cannot exceed the population")
    return q


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0 < delta < 1:
        raise ConfigError(f"delta={delta:g} is invalid: use 0 < δ < 1 (typically below 1/population)")
    return delta


def epsilon_from_history(history: Sequence[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """ε after composing the releases in `history` ((σ, q, count) runs), using the named accountant.

    RDP: sum of the RDP curves over Opacus' default orders, then the RDP → (ε, δ) conversion.
    PRV: Opacus' `compose_heterogeneous` over the runs (Gopi et al. 2021), upper bound with ε error 0.01.
    PLD: dp-accounting's PLDAccountant (add/remove adjacency, pessimistic discretisation 1e-3).
    """
    check_accountant(accountant)
    delta = _check_delta(delta)
    runs = [(float(s), _check_rate(q), int(n)) for s, q, n in history if int(n) > 0 and float(q) > 0]
    if not runs:
        return 0.0
    if any(s == 0 for s, _, _ in runs):
        return math.inf
    if accountant == "rdp":
        acc: Any = RDPAccountant()
        acc.history = list(runs)
        return float(acc.get_epsilon(delta=delta))
    if accountant == "prv":
        acc = PRVAccountant()
        acc.history = list(runs)
        return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    from dp_accounting import dp_event, pld

    pacc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    for s, q, n in runs:
        pacc.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(s)), n)
    return float(pacc.get_epsilon(delta))
