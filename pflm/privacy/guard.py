"""Budget enforcement: decide before each round whether its release keeps ε within the target."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from pflm.errors import ConfigError, PflmError
from pflm.privacy.accountant import RunningAccountant


class BudgetExhausted(PflmError):
    """Raised by `BudgetGuard.check` when the next round would exceed the privacy budget."""


@dataclass
class BudgetGuard:
    """Stops a run *before* a round whose release would push ε above `target_epsilon` at `delta`.

    The guard is stateless apart from the last stop message: the spent budget lives in the
    RunningAccountant, whose state is checkpointed, so a resume can never reset it.
    """

    target_epsilon: float
    delta: float
    stop_reason: str | None = field(default=None, init=False)
    last_epsilon_if_step: float | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not self.target_epsilon > 0 or math.isinf(self.target_epsilon):
            raise ConfigError(f"target_epsilon={self.target_epsilon} is invalid: use a finite ε > 0")
        if not 0 < self.delta < 1:
            raise ConfigError(f"delta={self.delta} is invalid: use 0 < δ < 1")

    def allows_next_round(
        self,
        accountant: RunningAccountant,
        sigma: float | Sequence[float],
        q: float,
        round_number: int | None = None,
    ) -> bool:
        """True if one more release (σ, q) keeps ε ≤ target; else False with `stop_reason` set.

        `round_number` labels the message (default: the accountant's release count + 1, i.e. 1-based).
        """
        eps = accountant.epsilon_if_step(sigma, q, self.delta)
        self.last_epsilon_if_step = eps
        if eps <= self.target_epsilon:
            self.stop_reason = None
            return True
        label = accountant.steps + 1 if round_number is None else round_number
        self.stop_reason = (
            f"stopping before round {label}: its release would raise ε to {eps:.3f} > target "
            f"{float(self.target_epsilon)} (δ={self.delta:g}, {accountant.accountant} accountant, "
            f"spent so far ε={accountant.epsilon(self.delta):.3f} over {accountant.steps} rounds)"
        )
        return False

    def check(
        self,
        accountant: RunningAccountant,
        sigma: float | Sequence[float],
        q: float,
        round_number: int | None = None,
    ) -> None:
        """Like `allows_next_round` but raises `BudgetExhausted(stop_reason)` instead of returning False."""
        if not self.allows_next_round(accountant, sigma, q, round_number):
            raise BudgetExhausted(self.stop_reason or "privacy budget exhausted")

    def rounds_affordable(
        self, accountant: RunningAccountant, sigma: float | Sequence[float], q: float, limit: int = 100_000
    ) -> int:
        """How many more rounds at (σ, q) fit in the budget (at most `limit`), by bisection on the count.

        Assumes ε grows with the number of rounds (true for the RDP and PLD accountants; PRV's numerical
        upper bound is monotone up to its 0.01 ε error). Planning aid only: enforcement uses
        `allows_next_round` round by round.
        """
        probe = accountant.copy()

        def fits(n: int) -> bool:
            trial = probe.copy()
            trial.step(sigma, q, n)
            return trial.epsilon(self.delta) <= self.target_epsilon

        if not fits(1):
            return 0
        lo, hi = 1, 2
        while hi <= limit and fits(hi):
            lo, hi = hi, hi * 2
        if hi > limit:
            return limit if fits(limit) else self._bisect(fits, lo, limit)
        return self._bisect(fits, lo, hi)

    @staticmethod
    def _bisect(fits, lo: int, hi: int) -> int:  # fits(lo) is True, fits(hi) is False
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid
        return lo
