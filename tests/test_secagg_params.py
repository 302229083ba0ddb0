"""SecAgg+ parameters (Bell et al. 2020 conditions) and the key-derived public graph."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from pflm.aggregator.secagg import SecAggConfig
from pflm.aggregator.secagg.graph import graph_seed, harary_graph
from pflm.aggregator.secagg.params import failure_bounds, hypergeom_sf, minimum_threshold, secagg_parameters


@pytest.mark.parametrize("n", [20, 100, 1000, 5000])
@pytest.mark.parametrize("malicious", [False, True])
def test_parameters_meet_their_targets(n: int, malicious: bool) -> None:
    p = secagg_parameters(n, 0.05, 0.05, 20, malicious)
    assert p.privacy_failure <= 2**-20 and p.correctness_failure <= 2**-20
    assert 2 <= p.t <= p.k <= n - 1 and (3 * p.t > 2 * p.k if malicious else 2 * p.t > p.k)
    assert failure_bounds(n, p.k, p.t, 0.05, 0.05, malicious) == (p.privacy_failure, p.correctness_failure)
    if n >= 100:
        assert p.k < n // 3  # sparse: the point of SecAgg+
    if p.k > 2:  # minimal: the next smaller degree meets no threshold
        smaller = [
            failure_bounds(n, p.k - 1, t, 0.05, 0.05, malicious)
            for t in range(max(2, minimum_threshold(p.k - 1, malicious)), p.k)
        ]
        assert not any(a <= 2**-20 and b <= 2**-20 for a, b in smaller) or (p.k - 1) % 2 == 1


def test_more_corruption_or_dropout_needs_more_neighbours() -> None:
    base = secagg_parameters(1000, 0.05, 0.05, 20)
    assert secagg_parameters(1000, 0.2, 0.05, 20).k > base.k
    assert secagg_parameters(1000, 0.05, 0.2, 20).k > base.k
    assert secagg_parameters(1000, 0.05, 0.05, 40).k > base.k
    assert secagg_parameters(1000, 0.05, 0.05, 20, malicious=True).k > base.k
    # an adversary that grinds the key-derived graph seed (2^64 tries) needs a tighter per-graph bound
    ground = secagg_parameters(1000, 0.05, 0.05, 20, True, 64)
    assert ground.k > secagg_parameters(1000, 0.05, 0.05, 20, True).k
    assert ground.privacy_failure * 2.0**64 <= 2**-20
    assert SecAggConfig(malicious=True).grinding_log2 == 64 and SecAggConfig().grinding_log2 == 0


def test_hypergeometric_tail_is_exact() -> None:
    from scipy.stats import hypergeom

    for pop, marked, draws, at_least in [(99, 5, 11, 3), (999, 50, 21, 11), (30, 6, 6, 2)]:
        assert hypergeom_sf(pop, marked, draws, at_least) == pytest.approx(
            hypergeom.sf(at_least - 1, pop, marked, draws), rel=1e-9, abs=1e-300
        )


def test_corrupted_neighbour_bound_holds_by_simulation() -> None:
    """The union bound over devices really bounds P[some honest device has ≥ t corrupted neighbours]."""
    n, k, t, gamma = 30, 6, 3, 0.2
    c = int(np.ceil(gamma * n))
    bound, _ = failure_bounds(n, k, t, gamma, 0.0, False)
    ids = list(range(n))
    corrupt = set(range(c))
    hits, trials = 0, 400
    for _ in range(trials):
        g = harary_graph(ids, k, secrets.token_bytes(16))
        hits += any(len(g[u] & corrupt) >= t for u in ids if u not in corrupt)
    assert hits / trials <= bound + 0.05


def test_graph_seed_binds_every_key_and_the_session() -> None:
    keys = {u: secrets.token_bytes(96) for u in range(10)}
    s = secrets.token_bytes(16)
    seed = graph_seed(s, 1, keys)
    assert graph_seed(s, 1, dict(reversed(list(keys.items())))) == seed  # order-free (sorted by id)
    assert graph_seed(secrets.token_bytes(16), 1, keys) != seed
    assert graph_seed(s, 2, keys) != seed
    changed = dict(keys)
    changed[7] = secrets.token_bytes(96)
    assert graph_seed(s, 1, changed) != seed
    dropped = {u: v for u, v in keys.items() if u != 7}
    assert graph_seed(s, 1, dropped) != seed


def test_config_exposes_printable_parameters() -> None:
    for n in (100, 1000):
        p = SecAggConfig(neighbours="log").parameters(n)
        assert (p.k, p.t) == SecAggConfig(neighbours="log").round_parameters(n)
        assert f"n={n} k={p.k} t={p.t}" in p.describe() and "γ=0.05" in p.describe()
    full = SecAggConfig().parameters(100)
    assert (full.k, full.t) == (99, 60) and full.privacy_failure == 0.0
