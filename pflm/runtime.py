"""CPU budget helpers shared by the simulator's device workers and the secure aggregator's vector threads."""

from __future__ import annotations

import os


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def resolve_workers(threads: int) -> int:
    """`threads`, or every CPU this process may use when it is 0."""
    return max(1, threads) if threads > 0 else available_cpus()
