"""The in-process fan-out: the round's simulated devices train in this process, several at a time (`DevicePool`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pflm.aggregator.base import Aggregator
from pflm.device.trainer import DeviceTrainer
from pflm.device.update import device_update
from pflm.driver.fanout import DeviceFanout, RoundTally
from pflm.privacy.clipping import NonFiniteUpdate
from pflm.round import RoundPlan
from pflm.secure_random import subkey
from pflm.simulation.devices import DevicePool

if TYPE_CHECKING:
    from pflm.driver.run import RunDriver


class LocalDevices(DeviceFanout):
    """Simulated devices on this machine; each (round, user) trains with the secret key
    `subkey(run key, "device", round, user)`, so a resumed round is redone identically."""

    def attach(self, driver: RunDriver) -> None:
        self.driver = driver
        self.pool = DevicePool(driver.cfg, driver.vocab_size, driver.server.prior_counts, driver.workers)
        self.trainer: DeviceTrainer = self.pool.trainers[0]

    def train_round(self, plan: RoundPlan, aggregator: Aggregator) -> RoundTally:
        d = self.driver
        steps, fd = d.server.postprocessors, d.fd
        self.pool.load_round(plan.round, plan.device_state, plan.rows)

        def device(trainer: DeviceTrainer, user: int) -> tuple:
            """Everything one device does: train, clip, and prepare its upload (runs on a device worker)."""
            key = subkey(d.run_key, "device", plan.round, user)
            res, vec, aux = device_update(trainer, steps, plan.ctx, user, fd.user_tokens("train", user), key)
            return res, aggregator.upload(user, vec, res.weight, aux)

        tally = RoundTally()
        nonfinite = 0
        device_eps: list[float] = []  # sample-level ε of each device's DP-SGD (not the user-level ε)
        for user, out in self.pool.map(device, plan.cohort):  # in cohort order: the sum is order-exact
            if isinstance(out, NonFiniteUpdate):
                nonfinite += 1
                aggregator.drop(user)
                continue
            if isinstance(out, BaseException):
                raise out
            res, upload = out
            aggregator.receive(upload)
            if "device_sample_epsilon" in res.metrics:
                device_eps.append(float(res.metrics["device_sample_epsilon"]))
            tally.loss_sum += res.train_loss * res.num_tokens
            tally.tokens += res.num_tokens
        tally.metrics = {"cohort": len(plan.cohort), "nonfinite_dropped": nonfinite}
        if device_eps:  # a different guarantee from the user-level "epsilon": per sentence, per device and round
            tally.metrics["device_sample_epsilon_max"] = max(device_eps)
            tally.metrics["device_sample_epsilon_median"] = float(np.median(device_eps))
        return tally

    def close(self) -> None:
        self.pool.close()
