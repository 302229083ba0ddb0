"""Runs a round's simulated devices several at a time (threads, one reused DeviceTrainer each), in cohort order.

Small LMs use a CPU core badly one device at a time (the LSTM recurrence, the optimizer step, clipping and
the secure-aggregation masking are serial work between the big matrix products), so `device_workers` devices
train concurrently, each with `threads / device_workers` torch threads. Every device's result depends only on
(seed, round, user) and the round's model, and results are handed back in cohort order, so the server sums
them in the same order whatever the number of workers: a run is exactly reproducible and resumable for a given
(threads, device_workers) setting. (Changing torch's thread count can change float rounding inside a device.)
"""

from __future__ import annotations

import queue
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from pflm.device.spec import DeviceSpec
from pflm.device.trainer import DeviceTrainer

T = TypeVar("T")
AHEAD = 2  # devices queued per worker beyond the one being consumed (bounds memory held in finished updates)


class DevicePool:
    """`workers` DeviceTrainers and the threads that drive them; `map` yields results in input order."""

    def __init__(self, spec: DeviceSpec, prior_counts: np.ndarray | None, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError("a device pool needs at least one worker")
        self.trainers = [DeviceTrainer(spec, prior_counts) for _ in range(workers)]
        self._free: queue.SimpleQueue[DeviceTrainer] = queue.SimpleQueue()
        for t in self.trainers:
            self._free.put(t)
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="pflm-device") if workers > 1 else None

    @property
    def workers(self) -> int:
        return len(self.trainers)

    def load_round(self, round_idx: int, device_state: dict[str, torch.Tensor], rows: torch.Tensor | None) -> None:
        for t in self.trainers:
            t.load_round(round_idx, device_state, rows)

    def _run(self, fn: Callable[[DeviceTrainer, int], T], user: int) -> T:
        trainer = self._free.get()  # never blocks for long: at most `workers` jobs run at once
        try:
            return fn(trainer, user)
        finally:
            self._free.put(trainer)

    def map(self, fn: Callable[[DeviceTrainer, int], T], users: Iterable[int]) -> Iterator[tuple[int, T | BaseException]]:
        """(user, fn(trainer, user) or the exception it raised) for each user, in the order given.

        With one worker everything runs in the calling thread; otherwise at most AHEAD·workers devices are
        started beyond the one the caller is waiting for.
        """
        if self._executor is None:
            for u in users:
                try:
                    yield u, fn(self.trainers[0], u)
                except Exception as e:  # noqa: BLE001 - handed to the caller, who decides
                    yield u, e
            return
        pending: deque[tuple[int, Future]] = deque()
        it = iter(users)
        limit = (AHEAD + 1) * self.workers
        try:
            for u in it:
                pending.append((u, self._executor.submit(self._run, fn, u)))
                if len(pending) >= limit:
                    yield self._take(pending)
            while pending:
                yield self._take(pending)
        finally:
            for _, f in pending:  # the caller stopped early (e.g. an error): do not leave devices running
                f.cancel()
            for _, f in pending:
                if not f.cancelled():
                    f.exception()

    @staticmethod
    def _take(pending: deque[tuple[int, Future]]) -> tuple[int, object]:
        u, f = pending.popleft()
        err = f.exception()
        return (u, err) if err is not None else (u, f.result())

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
