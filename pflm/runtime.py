"""CPU budget helpers shared by the simulator's device workers and the secure aggregator's vector threads (no torch import)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pflm.config import RecipeConfig


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(threads: int) -> int:
    """`threads`, or every CPU this process may use when it is 0."""
    return max(1, threads) if threads > 0 else available_cpus()


def thread_plan(cfg: "RecipeConfig") -> tuple[int, int, int]:
    """(device workers, torch threads per worker, all threads) for a recipe: `threads` CPU threads in all
    (0 = every CPU), split between `device_workers` concurrent devices (0 = one device per thread)."""
    total = cfg.threads or available_cpus()
    workers = cfg.device_workers or total
    return workers, max(1, total // workers), total


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run a block (evaluation, the server step) with n torch threads, then restore the previous setting."""
    import torch  # here, not at the top: protocol-only processes (a SecAgg device stage) never load torch

    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
