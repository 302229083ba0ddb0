"""Public neighbour graphs: complete (Bonawitz et al. 2017) or a random k-regular Harary graph (SecAgg+)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def graph_seed(run_seed: int, round_: int) -> bytes:
    """Public seed of a round's graph; both protocol modes derive the same one."""
    return hashlib.sha256(f"pflm-secagg-graph|{run_seed}|{round_}".encode()).digest()


def effective_degree(n: int, k: int) -> int:
    """Degree every node gets in `harary_graph` for n nodes and requested degree k."""
    if k >= n - 1:
        return n - 1
    return k + 1 if (k % 2 == 1 and n % 2 == 1) else k


def harary_graph(ids: Sequence[int], k: int, seed: bytes) -> dict[int, frozenset[int]]:
    """Symmetric graph on `ids` where every node has `effective_degree(n, k)` neighbours.

    Nodes are placed on a ring in a random order drawn from the public seed and joined to the ⌊k/2⌋ nearest
    on each side (plus the opposite node when k is odd and n even), so the graph is connected and regular.
    """
    ids = sorted(ids)
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("device ids in a cohort must be distinct")
    if k >= n - 1:
        everyone = frozenset(ids)
        return {u: everyone - {u} for u in ids}
    rng = np.random.default_rng(int.from_bytes(seed, "big"))
    ring = [ids[i] for i in rng.permutation(n)]
    half = k // 2
    if k % 2 == 1 and n % 2 == 1:
        half += 1
    adj: dict[int, set[int]] = {u: set() for u in ids}
    for i, u in enumerate(ring):
        for d in range(1, half + 1):
            v = ring[(i + d) % n]
            adj[u].add(v)
            adj[v].add(u)
        if k % 2 == 1 and n % 2 == 0:
            v = ring[(i + n // 2) % n]
            adj[u].add(v)
            adj[v].add(u)
    return {u: frozenset(vs) for u, vs in adj.items()}


def prune_to_threshold(graph: dict[int, frozenset[int]], members: set[int], threshold: int) -> set[int]:
    """Largest subset in which every member keeps ≥ threshold neighbours (those below cannot be recovered)."""
    alive = set(members)
    changed = True
    while changed:
        changed = False
        for u in sorted(alive):
            if len(graph[u] & alive) < threshold:
                alive.discard(u)
                changed = True
    return alive
