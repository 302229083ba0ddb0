"""Cohorts without secret sampling (`server.sampling: available`): availability + (k, b)-participation limits.

Each round every device is available independently with probability p (`server.availability`: a model of
devices that check in when idle, charging and on Wi-Fi, drawn from the run key so it is not replayable from
the public seed). The cohort is up to `cohort_size` devices drawn uniformly from the available ones that are
*eligible*: fewer than k rounds joined so far and none of the last b − 1 rounds. Every device put in a cohort
counts as a participation (even if it then crashes), so the limits the accountant relies on hold for every
device that could have contributed. Nothing here needs to be secret: DP-FTRL assumes no amplification.

The state (last round and count per device) is not checkpointed: it is a pure function of the run key and
the round, so `cohort(r)` replays rounds 0 … r − 1 after a resume. Counts of skipped (available but not
eligible) devices depend on devices' behaviour: they are returned for diagnostics.jsonl only.
"""

from __future__ import annotations

import numpy as np

from pflm.errors import ConfigError
from pflm.secure_random import SecureRandom

AVAILABILITY_PURPOSE = "availability"
CHOICE_PURPOSE = "cohort"


class ParticipationScheduler:
    """Round r's cohort under availability p, min separation b and at most k participations per device."""

    def __init__(self, population: int, cohort_size: int, availability: float, min_separation: int,
                 max_participations: int, rng: SecureRandom) -> None:
        if population < 1 or cohort_size < 1:
            raise ConfigError("participation needs a population and a cohort size of at least 1")
        if not 0 < availability <= 1:
            raise ConfigError(f"server.availability={availability} is invalid: use a probability in (0, 1]")
        self.population = int(population)
        self.cohort_size = int(cohort_size)
        self.availability = float(availability)
        self.b = int(min_separation)
        self.k = int(max_participations)
        self.rng = rng
        self._reset()

    def _reset(self) -> None:
        self.last = np.full(self.population, -(1 << 40), dtype=np.int64)  # round of last participation
        self.count = np.zeros(self.population, dtype=np.int64)
        self.next_round = 0

    def _draw(self, r: int) -> tuple[list[int], dict[str, int]]:
        if self.availability < 1:
            available = self.rng.bernoulli(r, self.population, self.availability, AVAILABILITY_PURPOSE)
        else:
            available = np.arange(self.population)
        ok = (r - self.last[available] >= self.b)
        if self.k > 0:
            ok &= self.count[available] < self.k
        eligible = available[ok]
        take = min(self.cohort_size, eligible.size)
        chosen = eligible[self.rng.choice(r, eligible.size, take, CHOICE_PURPOSE)] if take else eligible[:0]
        self.last[chosen] = r
        self.count[chosen] += 1
        stats = {"available_devices": int(available.size), "skipped_by_participation_limits": int((~ok).sum()),
                 "eligible_devices": int(eligible.size)}
        return sorted(int(u) for u in chosen), stats

    def cohort(self, r: int) -> tuple[list[int], dict[str, int]]:
        """(cohort of round r, diagnostics-only counts); replays earlier rounds when needed (resume)."""
        if r < self.next_round:
            self._reset()
        while self.next_round < r:
            self._draw(self.next_round)
            self.next_round += 1
        users, stats = self._draw(r)
        self.next_round = r + 1
        return users, stats
