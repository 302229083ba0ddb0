"""Budget enforcement: stop before the round that would exceed ε, with a clear message; resume keeps spent ε."""

from __future__ import annotations

import json
import re

import pytest

from pflm.errors import ConfigError
from pflm.privacy.accountant import RunningAccountant
from pflm.privacy.guard import BudgetExhausted, BudgetGuard

SIGMA, Q, DELTA, TARGET = 2.0, 0.05, 1e-5, 1.0


def _train_until_stop(acc: RunningAccountant, guard: BudgetGuard, max_rounds: int = 10_000) -> int:
    rounds = 0
    while rounds < max_rounds and guard.allows_next_round(acc, SIGMA, Q):
        acc.step(SIGMA, Q)
        rounds += 1
    return rounds


def test_guard_stops_before_exceeding():
    acc = RunningAccountant("rdp")
    guard = BudgetGuard(TARGET, DELTA)
    done = _train_until_stop(acc, guard)
    assert 5 < done < 10_000
    assert acc.epsilon(DELTA) <= TARGET
    assert acc.epsilon_if_step(SIGMA, Q, DELTA) > TARGET
    msg = guard.stop_reason
    assert msg is not None and "\n" not in msg
    m = re.match(r"stopping before round (\d+): its release would raise ε to (\d+\.\d{3}) > target 1\.0 ", msg)
    assert m, msg
    assert int(m.group(1)) == done + 1
    assert float(m.group(2)) == pytest.approx(acc.epsilon_if_step(SIGMA, Q, DELTA), abs=5e-4)
    assert guard.rounds_affordable(RunningAccountant("rdp"), SIGMA, Q) == done
    assert guard.rounds_affordable(acc, SIGMA, Q) == 0


def test_resume_never_resets_spent_budget():
    acc = RunningAccountant("rdp")
    guard = BudgetGuard(TARGET, DELTA)
    done = _train_until_stop(acc, guard)
    state = json.loads(json.dumps(acc.state_dict()))  # as written to a checkpoint
    resumed = RunningAccountant("rdp")
    resumed.load_state_dict(state)
    assert resumed.epsilon(DELTA) == acc.epsilon(DELTA)
    assert not BudgetGuard(TARGET, DELTA).allows_next_round(resumed, SIGMA, Q, round_number=done + 1)
    with pytest.raises(BudgetExhausted, match=f"before round {done + 1}:"):
        BudgetGuard(TARGET, DELTA).check(resumed, SIGMA, Q)


def test_partial_resume_continues_to_the_same_stop():
    straight = RunningAccountant("rdp")
    total = _train_until_stop(straight, BudgetGuard(TARGET, DELTA))
    first = RunningAccountant("rdp")
    _train_until_stop(first, BudgetGuard(TARGET, DELTA), max_rounds=total // 2)
    second = RunningAccountant("rdp")
    second.load_state_dict(first.state_dict())
    more = _train_until_stop(second, BudgetGuard(TARGET, DELTA))
    assert total // 2 + more == total
    assert second.history == straight.history


def test_guard_with_adaptive_clipping_noise_pair():
    acc = RunningAccountant("rdp")
    guard = BudgetGuard(TARGET, DELTA)
    sigma_d = (SIGMA**-2 - (2 * 2.0) ** -2) ** -0.5
    n = 0
    while guard.allows_next_round(acc, [sigma_d, 4.0], Q):
        acc.step([sigma_d, 4.0], Q)
        n += 1
    assert n == guard.rounds_affordable(RunningAccountant("rdp"), SIGMA, Q)


def test_guard_validation():
    with pytest.raises(ConfigError):
        BudgetGuard(0.0, 1e-5)
    with pytest.raises(ConfigError):
        BudgetGuard(1.0, 1.0)
    assert not BudgetGuard(1.0, 1e-5).allows_next_round(RunningAccountant("rdp"), 0.0, 0.01)
