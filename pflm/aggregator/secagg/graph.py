"""Public neighbour graphs (complete, or SecAgg+'s random Harary ring) from randomness the server cannot choose."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np


def graph_seed(session_id: bytes, round_: int, keys: Mapping[int, bytes]) -> bytes:
    """Public seed of a round's graph: a hash of every advertised public key (sorted by device id) bound to the
    session. Keys are fresh per round and made after the session id is fixed, so the server cannot pick the
    graph after seeing them — only drop advertisers, each of which the devices see (see docs/secagg.md)."""
    h = hashlib.sha256(b"pflm-secagg-graph-v2" + session_id + struct.pack(">qq", round_, len(keys)))
    for u in sorted(keys):
        h.update(struct.pack(">qI", u, len(keys[u])) + keys[u])
    return h.digest()


def effective_degree(n: int, k: int) -> int:
    """Degree every node gets in `harary_graph` for n nodes and requested degree k."""
    if k >= n - 1:
        return n - 1
    return k + 1 if (k % 2 == 1 and n % 2 == 1) else k


def harary_graph(ids: Sequence[int], k: int, seed: bytes) -> dict[int, frozenset[int]]:
    """See `_harary` (cached: in simulation every device recomputes the same public graph)."""
    return dict(_harary(tuple(sorted(ids)), k, seed))


@lru_cache(maxsize=64)
def _harary(ids: tuple[int, ...], k: int, seed: bytes) -> dict[int, frozenset[int]]:
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
