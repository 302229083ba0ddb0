"""Audit canaries inside a real run: canary users in the population and canary clients in the in-process fan-out.

Canaries must take the same path as real users — Poisson cohort sampling from the run key, on-device clipping,
aggregation, the server's noise, averaging and the server optimizer — or the audit would not catch a broken
pipeline. So nothing here touches the server or the privacy chain:

* `CanaryData` is the prepared dataset with extra *training users* appended after the real ones: sentence-canary
  users (each holds its canary phrase repeated R times; a phrase may be held by several users) and canary-client ids. The driver's population, and so
  cohort sampling and the accountant's q, include them.
* `CanaryDevices` is the in-process fan-out (`LocalDevices`) in which a canary client, when the cohort samples it,
  uploads a fixed secret random unit direction scaled to the round's clip bound (Andrew et al. 2024) instead of
  training — through the same device-side clipping and `aggregator.upload` as every device. It also records the
  cosine of every canary direction (inserted or held out) with each round's model delta and the final one.

Simulation backend only (the Flower fan-out is not instrumented); recipes with PEU row selection are refused (the
release vector then covers different rows each round, so a fixed direction has no meaning).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pflm.aggregator.base import Aggregator
from pflm.data.store import FederatedData
from pflm.device.trainer import DeviceResult, DeviceTrainer
from pflm.errors import PflmError
from pflm.round import RoundPlan
from pflm.secure_random import SecureRandom
from pflm.simulation.local import LocalDevices

if TYPE_CHECKING:
    from pflm.driver.run import RunDriver

DIRECTION_PURPOSE = "audit-canary-direction"


class CanaryData(FederatedData):
    """`base` with `len(sentence_users)` sentence-canary users and `client_users` canary-client ids appended to the
    train split (after the first `real_users` real users, which stay ids 0 … real_users − 1)."""

    def __init__(self, base: FederatedData, real_users: int, sentence_users: list[list[list[int]]], client_users: int) -> None:
        self.__dict__.update(base.__dict__)  # same files, tokenizer and split stores
        self.real_users = real_users
        self.sentence_users = sentence_users
        self.client_users = client_users

    @property
    def first_client(self) -> int:
        return self.real_users + len(self.sentence_users)

    def sentence_user_id(self, i: int) -> int:
        return self.real_users + i

    def client_id(self, j: int) -> int:
        return self.first_client + j

    def num_users(self, split: str) -> int:
        if split != "train":
            return super().num_users(split)
        return self.first_client + self.client_users

    def user_tokens(self, split: str, user: int | str) -> list[list[int]]:
        if split != "train" or isinstance(user, str) or user < self.real_users:
            return super().user_tokens(split, user)
        if user < self.first_client:
            return [list(s) for s in self.sentence_users[user - self.real_users]]
        raise PflmError(f"user {user} is an audit canary client: it uploads a direction, it has no sentences")


class CanaryDevices(LocalDevices):
    """The in-process fan-out with `len(inserted)` canary clients in the population; tracks canary cosines.

    `directions_rng` (keyed by the audit's secret key) draws one N(0, I) vector per canary (stream j), normalised
    to a unit direction: canaries 0 … n_inserted − 1 are the inserted ones (user id `data.client_id(j)`), the rest
    are held out (never uploaded; the null distribution)."""

    def __init__(self, data: CanaryData, directions_rng: SecureRandom, total_directions: int) -> None:
        self.data = data
        self.rng = directions_rng
        self.total = total_directions
        self.client_index = {data.client_id(j): j for j in range(data.client_users)}
        self.participations = [0] * data.client_users
        self.round_cosines: list[torch.Tensor] = []  # per round: [total] cosines with θ_{r+1} − θ_r
        self.final_cosines: torch.Tensor | None = None

    def attach(self, driver: RunDriver) -> None:
        super().attach(driver)
        server = driver.server
        if driver.cfg.peu.mode != "all":
            raise PflmError("the audit needs every vocabulary row in each release; set peu.mode=all")
        if driver.cfg.server.weighting != "uniform":
            raise PflmError("the audit's canary clients need server.weighting=uniform")
        self.layout, self.params = server.global_layout, server.params
        dim = server.release_dim()
        if dim != self.layout.dim:
            raise PflmError(f"release dimension {dim} differs from the model layout's {self.layout.dim}; set peu.mode=all")
        d = torch.empty(self.total, dim, dtype=torch.float32)
        for j in range(self.total):
            z = self.rng.standard_normal(j, dim, DIRECTION_PURPOSE)
            d[j] = (z / z.norm()).float()
        self.directions = d
        self.theta0 = self._flat()
        self.prev = self.theta0.clone()

    @torch.no_grad()
    def _flat(self) -> torch.Tensor:
        return self.layout.flatten({n: p.detach() for n, p in self.params.items()})

    def _cosines(self, delta: torch.Tensor) -> torch.Tensor:
        n = float(delta.norm())
        return torch.zeros(self.total) if n == 0 else (self.directions @ delta) / n

    def _observe(self) -> None:
        cur = self._flat()
        if len(self.round_cosines) < self.driver.server.rounds_done:
            self.round_cosines.append(self._cosines(cur - self.prev))
        self.prev = cur

    def train_round(self, plan: RoundPlan, aggregator: Aggregator):
        self._observe()
        for u in plan.cohort:
            if u in self.client_index:
                self.participations[self.client_index[u]] += 1
        return super().train_round(plan, aggregator)

    def device_upload(self, trainer: DeviceTrainer, plan: RoundPlan, aggregator: Aggregator, user: int) -> tuple:
        j = self.client_index.get(user)
        if j is None:
            return super().device_upload(trainer, plan, aggregator, user)
        vec, aux = self.directions[j] * float(plan.ctx.clip_bound), {}
        for step in self.driver.server.postprocessors:  # the same device-side chain as device_update
            vec, a = step.on_device(vec, plan.ctx)
            aux.update(a)
        res = DeviceResult(update=vec, weight=1.0, num_tokens=0, num_sentences=0, train_loss=0.0, seconds=0.0)
        return res, aggregator.upload(user, vec, res.weight, aux)

    def close(self) -> None:
        self._observe()
        self.final_cosines = self._cosines(self.prev - self.theta0)
        super().close()
