"""Unit tests of the secure-aggregation building blocks: config, fixed point, Shamir, neighbour graphs, masks."""

from __future__ import annotations

import numpy as np
import pytest

from pflm.aggregator.secagg import SecAggConfig, SecureAggregator, shamir
from pflm.aggregator.secagg.fixed_point import FixedPointCodec, rounding_key
from pflm.aggregator.secagg.graph import effective_degree, harary_graph, prune_to_threshold
from pflm.aggregator.secagg.masking import MaskStream
from pflm.errors import AggregationFailed, ConfigError


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"bits": 8}, "bits"),
        ({"threshold": 0.0}, "threshold"),
        ({"neighbours": "some"}, "neighbours"),
        ({"neighbours": 1}, "neighbours"),
        ({"dropout_share": 1.0}, "dropout_share"),
        ({"mode": "fast"}, "mode"),
        ({"max_weight": -1.0}, "max_weight"),
        ({"aux_keys": ["a", "a"]}, "aux_keys"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        SecAggConfig(**kwargs)


def test_config_from_recipe_mapping() -> None:
    from pflm.schema import from_dict

    cfg = from_dict(SecAggConfig, {"neighbours": "12", "bits": 24, "dropout_share": 0.1}, "aggregation.secagg")
    assert cfg.neighbours == 12 and cfg.bits == 24 and cfg.dropout_share == 0.1
    assert from_dict(SecAggConfig, {"neighbours": "log"}, "aggregation.secagg").neighbours == "log"
    with pytest.raises(ConfigError, match="did you mean 'threshold'"):
        from_dict(SecAggConfig, {"treshold": 0.5}, "aggregation.secagg")
    assert SecureAggregator.from_options({"mode": "simulate"}).config.mode == "simulate"
    with pytest.raises(ConfigError, match=r"^aggregation\.secagg\.bits=70 must be"):
        from_dict(SecAggConfig, {"bits": 70}, "aggregation.secagg")


def test_config_degree_and_threshold() -> None:
    assert SecAggConfig(neighbours="8").neighbours == 8
    cfg = SecAggConfig(neighbours="log")
    bell = cfg.bell_parameters(400)
    assert cfg.round_parameters(400) == (bell.k, bell.t) and bell.k < 40
    assert cfg.degree(5) == 4  # capped at n − 1
    assert SecAggConfig().degree(10) == 9
    plain = SecAggConfig(threshold=0.55)
    assert plain.threshold_for(18) == 10 and plain.threshold_for(2) == 2  # always > k/2
    assert SecAggConfig(malicious=True).threshold == 0.7
    assert SecAggConfig(malicious=True).threshold_for(9) == 7  # > 2k/3
    for bad in ({"threshold": 0.5}, {"threshold": 0.65, "malicious": True}, {"corrupt_fraction": 0.6}):
        with pytest.raises(ConfigError, match="threshold|corrupt_fraction"):
            SecAggConfig(**bad)


def _codec(n: int = 10, dim: int = 1000, bits: int = 32, bound: float = 1.0) -> FixedPointCodec:
    return FixedPointCodec(bits, n, dim, bound, 1.0, ("clipped",), 1.0)


def test_sum_of_n_extreme_devices_cannot_wrap() -> None:
    for bits in (16, 32, 48):
        codec = _codec(n=7, dim=4, bits=bits)
        for sign in (1.0, -1.0):
            encs = [codec.encode(sign * np.ones(4), sign, {"clipped": sign}, bytes(32)).ints for _ in range(7)]
            total = encs[0].copy()
            for e in encs[1:]:
                total += e  # word arithmetic wraps mod 2^word; decode reduces mod 2^b
            dec = codec.decode(total)
            assert np.allclose(dec.update, 7 * sign) and dec.weight == pytest.approx(7 * sign)
            assert dec.aux["clipped"] == pytest.approx(7 * sign) and dec.clamped == 0
        assert 7 * codec.level <= (1 << (bits - 1)) - 1
        if bits < 45:  # below the 2^42 cap the scale uses the whole range: one more device would not fit
            assert 8 * codec.level > (1 << (bits - 1)) - 1


def test_bits_too_small_for_cohort() -> None:
    with pytest.raises(AggregationFailed, match="bits"):
        FixedPointCodec(16, 1 << 16, 10, 1.0, 1.0, (), 1.0)


def test_stochastic_rounding_is_unbiased_and_seeded() -> None:
    codec = FixedPointCodec(16, 1000, 20000, 1.0, 1.0, (), 1.0)  # coarse: L = 32
    x = np.full(20000, 0.3 / codec.value_scale + 5 / codec.value_scale)  # 5.3 steps
    a = codec.encode(x, 0.0, {}, rounding_key(1, 2, 3)).ints
    b = codec.encode(x, 0.0, {}, rounding_key(1, 2, 3)).ints
    c = codec.encode(x, 0.0, {}, rounding_key(1, 2, 4)).ints
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    vals = codec.to_signed(a)[:20000]
    assert set(np.unique(vals)) == {5, 6}
    assert abs(vals.mean() - 5.3) < 0.02  # std of the mean ≈ 0.0032


def test_clamping_is_counted() -> None:
    codec = _codec(n=4, dim=100, bound=0.5)
    x = np.zeros(100)
    x[:7] = 0.9  # 7 coordinates beyond the bound
    enc = codec.encode(x, 3.0, {"clipped": 1.0}, bytes(32))  # weight 3 > max_weight 1
    assert enc.clamped == 8
    dec = codec.decode(enc.ints)
    assert dec.clamped == 8 and np.allclose(dec.update[:7], 0.5) and dec.weight == pytest.approx(1.0)


def test_shamir_threshold() -> None:
    secret = int.from_bytes(b"\xff" * 32, "big")
    xs = list(range(1, 11))
    shares = shamir.split(secret, xs, 6)
    assert shamir.reconstruct(shares, 6) == secret
    assert shamir.reconstruct({x: shares[x] for x in (2, 4, 5, 7, 9, 10)}, 6) == secret
    assert shamir.reconstruct({x: shares[x] for x in (1, 2, 3, 4, 5)}, 5) != secret  # t−1 shares say nothing
    with pytest.raises(ValueError):
        shamir.reconstruct({x: shares[x] for x in (1, 2, 3)}, 6)
    assert shamir.from_bytes(shamir.to_bytes(shares[3])) == shares[3]


@pytest.mark.parametrize("n, k", [(20, 4), (20, 5), (19, 5), (17, 8), (10, 9), (10, 30), (400, 18)])
def test_graph_is_symmetric_and_regular(n: int, k: int) -> None:
    ids = list(range(100, 100 + 3 * n, 3))
    g = harary_graph(ids, k, b"seed")
    d = effective_degree(n, k)
    assert set(g) == set(ids)
    for u, vs in g.items():
        assert u not in vs and len(vs) == d
        assert all(u in g[v] for v in vs)
    assert g == harary_graph(ids, k, b"seed")
    if k < n - 1:
        assert g != harary_graph(ids, k, b"other")


def test_prune_removes_unrecoverable_devices() -> None:
    g = harary_graph(list(range(12)), 4, b"s")
    alive = set(range(12)) - set(sorted(g[0])[:3])  # device 0 keeps 1 live neighbour
    kept = prune_to_threshold(g, alive, 2)
    assert 0 not in kept
    assert all(len(g[u] & kept) >= 2 for u in kept)


def test_mask_stream_is_uniform_and_key_dependent() -> None:
    s = MaskStream(50_000, 32)
    a = s.expand(b"k" * 32).copy()
    b = s.expand(b"j" * 32).copy()
    assert not np.array_equal(a, b) and np.array_equal(a, s.expand(b"k" * 32))
    counts = np.bincount((a >> 26).astype(np.int64), minlength=64)
    from scipy.stats import chisquare

    assert chisquare(counts).pvalue > 1e-6


def test_chunked_mask_stream_equals_one_keystream() -> None:
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    n = 3 * MaskStream.CHUNK + 5
    for bits, dtype, workers in ((32, np.uint32, 1), (48, np.uint64, 1), (32, np.uint32, 3), (48, np.uint64, 2)):
        s = MaskStream(n, bits, workers)  # several workers: each range starts its keystream mid-stream
        key = bytes(range(32))
        enc = Cipher(algorithms.AES(key[:16]), modes.CTR(bytes(16))).encryptor()  # the mask PRG: AES-128-CTR
        want = enc.update(bytes(n * np.dtype(dtype).itemsize))
        assert np.array_equal(s.expand(key), np.frombuffer(want, dtype=dtype))
        acc = np.zeros(n, dtype=dtype)
        s.add_many(acc, [(key, 1), (bytes(32), 1), (key, -1), (bytes(32), -1)])
        assert not acc.any()


def _reference_encode(codec: FixedPointCodec, x: np.ndarray, weight: float, key: bytes) -> np.ndarray:
    """The encoding written out in one piece: one keystream for the whole vector, no chunks, no threads."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    L = codec.level
    v = np.concatenate([x.astype(np.float64) * codec.value_scale, [weight * L / codec.weight_bound, 0.0]])
    stream = Cipher(algorithms.AES(key[:16]), modes.CTR(bytes(16))).encryptor().update(bytes(4 * v.size))
    v = np.floor(v + np.frombuffer(stream, dtype=np.uint32) * 2.0**-32)
    clamped = int(np.count_nonzero(np.abs(v) > L))
    v = np.clip(v, -L, L)
    v[-1] = clamped
    return (v.astype(np.int64) % (1 << codec.bits)).astype(np.uint64)


@pytest.mark.parametrize("bits", [32, 40])
def test_chunked_threaded_encoding_equals_one_piece(bits: int) -> None:
    from pflm.aggregator.secagg import fixed_point

    dim = 3 * fixed_point.CHUNK + 5  # several chunks and a ragged end; the tail crosses no chunk boundary
    x = np.random.default_rng(0).standard_normal(dim).astype(np.float32) * 0.01
    x[[7, fixed_point.CHUNK, dim - 1]] = [3.0, -3.0, 2.0]  # clamped values in different chunks
    key = bytes(range(32))
    want = None
    for workers in (1, 2, 3):
        codec = FixedPointCodec(bits, 50, dim, 1.0, 1.0, (), 1.0, workers)
        enc = codec.encode(x, 0.5, {}, key)
        if want is None:
            want = _reference_encode(codec, x, 0.5, key)
        assert enc.clamped == 3 and enc.finite
        assert np.array_equal(enc.ints.astype(np.uint64), want), workers
    x[fixed_point.CHUNK + 9] = np.nan
    assert not FixedPointCodec(bits, 50, dim, 1.0, 1.0, (), 1.0, 2).encode(x, 0.5, {}, key).finite


def test_fused_masking_equals_encode_then_mask() -> None:
    from pflm.aggregator.base import RoundContext
    from pflm.aggregator.secagg import fixed_point

    dim = 2 * MaskStream.CHUNK + 77
    ctx = RoundContext(round=1, dim=dim, cohort=list(range(5)), clip_bound=1.0, seed=3)
    agg = SecureAggregator(SecAggConfig(threads=2))
    agg.begin(ctx)
    x = np.random.default_rng(1).standard_normal(dim).astype(np.float32) * 1e-3
    codec = FixedPointCodec(32, 5, dim, 1.0, 1.0, ("clipped",), 1.0, 2)
    key = rounding_key(3, 1, 0)
    client, peers = agg.clients[0], agg.server.mask_list(0)
    stream = MaskStream(codec.length, 32, workers=2)
    separate = client.masked_input(codec.encode(x, 1.0, {"clipped": 1.0}, key).ints, peers, stream)
    client._stage = "received"  # white-box: an honest device masks once per round; replay the step for the test
    fused = client.masked_input(codec.encoder(x, 1.0, {"clipped": 1.0}, key), peers, stream)
    assert np.array_equal(separate, fused)
    assert fixed_point.CHUNK % 4 == 0 and MaskStream.CHUNK % 4 == 0
