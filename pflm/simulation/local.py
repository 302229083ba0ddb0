"""The in-process fan-out: the round's simulated devices train in this process, several at a time (`DevicePool`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import traceback

import numpy as np

from pflm.aggregator.base import Aggregator
from pflm.device.trainer import DeviceTrainer
from pflm.device.update import device_update, finish_update
from pflm.device.vectorized import VectorizedDevices
from pflm.driver.fanout import DeviceFanout, RoundTally
from pflm.errors import PflmError
from pflm.privacy.clipping import NonFiniteUpdate
from pflm.round import RoundPlan
from pflm.secure_random import subkey
from pflm.simulation.devices import DevicePool
from pflm.simulation.faults import DROPPED_UNTRAINED, FaultPlan, corrupt_upload

if TYPE_CHECKING:
    from pflm.driver.run import RunDriver


class LocalDevices(DeviceFanout):
    """Simulated devices on this machine; each (round, user) trains with the secret key
    `subkey(run key, "device", round, user)`, so a resumed round is redone identically."""

    def attach(self, driver: RunDriver) -> None:
        self.driver = driver
        self.faults = FaultPlan(driver.cfg.faults, driver.run_key, driver.cfg.aggregation.kind)
        self.pool = DevicePool(driver.server.device_spec, driver.server.prior_counts, driver.workers)
        self.trainer: DeviceTrainer = self.pool.trainers[0]
        self.vector: VectorizedDevices | None = None
        if driver.server.device_spec.training.vectorize > 1:  # many devices per kernel (one group at a time)
            self.vector = VectorizedDevices(self.trainer)

    def train_round(self, plan: RoundPlan, aggregator: Aggregator) -> RoundTally:
        self.pool.load_round(plan.round, plan.device_state, plan.rows)

        def device(trainer: DeviceTrainer, user: int) -> tuple:
            return self.device_upload(trainer, plan, aggregator, user)

        tally = RoundTally()
        nonfinite = 0
        device_eps: list[float] = []  # sample-level ε of each device's DP-SGD (not the user-level ε)
        faults = self.faults.plan(plan.round, plan.cohort)
        users = [u for u in plan.cohort if faults.get(u) not in DROPPED_UNTRAINED]
        outs = self.vector_uploads(plan, aggregator, users) if self.vector else self.pool.map(device, users)
        for user, out in outs:
            if isinstance(out, NonFiniteUpdate):
                nonfinite += 1
                aggregator.drop(user)
                continue
            if isinstance(out, BaseException):
                raise self._bug(plan.round, user, out)
            res, upload = out
            if user in faults:  # a simulated corrupt upload replaces the honest one
                upload = corrupt_upload(upload, faults[user], plan.ctx.dim)
            aggregator.receive(upload)
            if "device_sample_epsilon" in res.metrics:
                device_eps.append(float(res.metrics["device_sample_epsilon"]))
            tally.loss_sum += res.train_loss * res.num_tokens
            tally.tokens += res.num_tokens
        for user, kind in faults.items():
            if kind in DROPPED_UNTRAINED:
                aggregator.drop(user)
        tally.metrics = {"cohort": len(plan.cohort), "nonfinite_dropped": nonfinite, **self.faults.counts(faults)}
        if device_eps:  # a different guarantee from the user-level "epsilon": per sentence, per device and round
            tally.metrics["device_sample_epsilon_max"] = max(device_eps)
            tally.metrics["device_sample_epsilon_median"] = float(np.median(device_eps))
        return tally

    def device_upload(self, trainer: DeviceTrainer, plan: RoundPlan, aggregator: Aggregator, user: int) -> tuple:
        """Everything one device does: train, clip, and prepare its upload (runs on a device worker)."""
        d = self.driver
        key = subkey(d.run_key, "device", plan.round, user)
        res, vec, aux = device_update(trainer, d.server.postprocessors, plan.ctx, user, d.fd.user_tokens("train", user), key)
        return res, aggregator.upload(user, vec, res.weight, aux)

    def vector_uploads(self, plan: RoundPlan, aggregator: Aggregator, users: list[int]) -> Iterator[tuple]:
        """(user, (result, upload) or exception) in cohort order, devices trained `device.vectorize` at a time."""
        assert self.vector is not None
        d = self.driver
        size = d.server.device_spec.training.vectorize
        for i in range(0, len(users), size):
            group = users[i : i + size]
            jobs = [(u, d.fd.user_tokens("train", u), subkey(d.run_key, "device", plan.round, u)) for u in group]
            try:
                results = self.vector.train_group(jobs)
            except Exception as e:  # noqa: BLE001 - a bug: reported like a failing device
                yield group[0], e
                return
            for u, res in zip(group, results):
                try:
                    vec, aux = finish_update(d.server.device_spec.weighting, d.server.postprocessors, plan.ctx, res)
                    yield u, (res, aggregator.upload(u, vec, res.weight, aux))
                except Exception as e:  # noqa: BLE001 - NonFiniteUpdate is handled by the caller
                    yield u, e

    def _bug(self, round_idx: int, user: int, err: BaseException) -> PflmError:
        """A real exception in device code is a bug, not a simulated fault: keep the traceback in the run's
        error.log and stop the run with one line."""
        log = self.driver.run_dir / "error.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"round {round_idx}, device {user}:\n")
            f.write("".join(traceback.format_exception(err)))
        return PflmError(f"device {user} failed in round {round_idx} ({type(err).__name__}: {err}); "
                         f"traceback in {log}")

    def close(self) -> None:
        self.pool.close()
