"""Device randomness comes from a secret per-(round, user) key, never from the public recipe seed.

Written as an attacker who knows the recipe (seed, round, user, data, model) and tries to replay a device's
DP-SGD noise or batch choice; and as an operator who needs the same key to reproduce an update bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pflm.config import load_recipe
from pflm.device.batching import device_setup
from pflm.device.dpsgd import NOISE_PURPOSE, dpsgd_random
from pflm.device.spec import DeviceSpec
from pflm.device.trainer import DeviceTrainer
from pflm.errors import ConfigError
from pflm.secure_random import derive_key, new_key, subkey

VOCAB = 120
SEED, ROUND, USER = 0, 3, 17


def recipe(seed: int = SEED, **extra):
    over = {"seed": seed, "model.embedding_dim": 8, "model.hidden_dim": 16, "model.tie_embeddings": "false",
            "device.batch_size": 4, "device.lr": 0.5, "device.loss": "nce", "device.num_samples": 8,
            "data.max_tokens": 12, "dpsgd.enabled": "true", "dpsgd.noise_multiplier": 1.0,
            "dpsgd.max_grad_norm": 0.5, "dpsgd.grad_sample_mode": "hooks"}
    over.update(extra)
    return load_recipe(None, [f"{k}={v}" for k, v in over.items()])


def sentences(n: int = 24) -> list[list[int]]:
    rng = np.random.default_rng(5)
    return [list(rng.integers(4, VOCAB, size=int(k))) for k in rng.integers(3, 10, size=n)]


def make_trainer(cfg) -> DeviceTrainer:
    torch.manual_seed(0)  # the same initial model in every trainer (it stands in for the server's model)
    tr = DeviceTrainer(DeviceSpec.from_recipe(cfg, VOCAB), np.ones(VOCAB))
    tr.load_round(ROUND, {k: v.detach().clone() for k, v in tr.model.state_dict().items()}, None)
    return tr


@pytest.fixture(scope="module")
def trained():
    """Updates of one (seed, round, user) under several keys."""
    cfg = recipe()
    tr = make_trainer(cfg)
    k1, k2 = new_key(), new_key()
    sents = sentences()
    u1 = tr.train(USER, sents, k1).update
    u1_again = tr.train(USER, sents, k1).update
    u2 = tr.train(USER, sents, k2).update
    return tr, sents, (k1, k2), (u1, u1_again, u2)


def test_different_keys_give_different_updates_for_the_same_public_inputs(trained):
    tr, _, _, (u1, _, u2) = trained
    assert tr.dpsgd is not None and tr.dpsgd.last_metrics["device_dp_steps"] >= 4
    assert not torch.equal(u1, u2)
    # not a tiny difference: the noise dominates, so the two updates are nearly uncorrelated
    assert float(torch.corrcoef(torch.stack([u1, u2]))[0, 1]) < 0.5


def test_same_key_gives_a_bit_identical_update(trained):
    _, _, _, (u1, u1_again, _) = trained
    assert torch.equal(u1, u1_again)


def test_the_public_seed_plays_no_part(trained):
    """Same key, different recipe seed: bit-identical update — the update is a function of the key, not the seed."""
    _, sents, (k1, _), (u1, _, _) = trained
    other = make_trainer(recipe(seed=SEED + 12345))
    assert torch.equal(other.train(USER, sents, k1).update, u1)


def _old_generator(seed: int, round_idx: int, user: int) -> tuple[np.random.Generator, torch.Generator]:
    """How device randomness used to be derived: from the PUBLIC (seed, round, user)."""
    rng = np.random.default_rng([seed, round_idx, user, 0xD0])
    return rng, torch.Generator().manual_seed(int(rng.integers(2**62)))


def _noise_only_delta(tr: DeviceTrainer, key: bytes, q: float, n: int) -> torch.Tensor:
    """One empty-Poisson-batch step (zero gradient): the parameter change is −lr · noise / (q·n)."""
    with torch.no_grad():
        for p, p0 in zip(tr.trainable, tr._start):
            p.copy_(p0)
    tr.optimizer.state.clear()
    tr.dpsgd._reset(q, n, key)
    tr.dpsgd._empty_step()
    return torch.cat([(p.detach() - p0).reshape(-1) for p, p0 in zip(tr.trainable, tr._start)])


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_noise_is_the_keyed_stream_with_opacus_scaling(mode):
    sigma, clip, lr, q, n = 1.7, 0.5, 0.5, 0.25, 40  # expected batch size q·n = 10
    cfg = recipe(**{"dpsgd.noise_multiplier": sigma, "dpsgd.max_grad_norm": clip, "device.lr": lr,
                    "dpsgd.grad_sample_mode": mode})
    tr = make_trainer(cfg)
    key = new_key()
    delta = _noise_only_delta(tr, key, q, n).double()
    assert delta.numel() > 4_000  # a correct std leaves ±5 % with probability < 1e-5 (≈ 4.8σ)
    # Opacus: p.grad = (summed_grad + N(0, (σ·C)²)) / expected_batch_size; SGD: Δ = −lr · p.grad
    want_std = lr * sigma * clip / (q * n)
    assert float(delta.std()) == pytest.approx(want_std, rel=0.05)
    assert abs(float(delta.mean())) < 5 * want_std / delta.numel() ** 0.5
    # ... and it is exactly step 0 of SecureRandom(subkey(key, "dpsgd")), float32 stream "noise", all parameters
    noise = dpsgd_random(key).normal_f32(0, delta.numel(), sigma * clip, NOISE_PURPOSE).double()
    torch.testing.assert_close(delta, -lr * noise / (q * n), rtol=1e-5, atol=1e-7)


def test_noise_on_a_real_batch_is_added_to_the_clipped_sum():
    """A non-empty step: (update with σ) − (update with σ = 0) is exactly −lr·noise/E for the keyed noise."""
    sigma, clip, lr = 2.0, 0.5, 0.5
    cfg = recipe(**{"dpsgd.noise_multiplier": sigma, "dpsgd.max_grad_norm": clip, "device.lr": lr})
    tr = make_trainer(cfg)
    from pflm.device.batching import pack_sentences

    seqs, lengths = pack_sentences(sentences(6), cfg.data.max_tokens)
    inputs, targets, mask = tr.local_vocab.batch(seqs, lengths)
    key = new_key()
    deltas = []
    for nm in (0.0, sigma):
        with torch.no_grad():
            for p, p0 in zip(tr.trainable, tr._start):
                p.copy_(p0)
        tr.dpsgd._reset(0.5, 12, key)  # E = 6
        tr.dpsgd.optimizer.noise_multiplier = nm
        tr.dpsgd._step(inputs, targets, mask, torch.Generator().manual_seed(3))
        deltas.append(torch.cat([(p.detach() - p0).reshape(-1) for p, p0 in zip(tr.trainable, tr._start)]).double())
    tr.dpsgd.optimizer.noise_multiplier = cfg.dpsgd.noise_multiplier
    assert float(deltas[0].norm()) > 0  # the data moved the model
    noise = dpsgd_random(key).normal_f32(0, deltas[0].numel(), sigma * clip, NOISE_PURPOSE).double()
    torch.testing.assert_close(deltas[1] - deltas[0], -lr * noise / 6.0, rtol=1e-4, atol=1e-6)


def test_replaying_the_old_seed_derived_generators_does_not_reproduce_the_noise():
    sigma, clip, lr, q, n = 1.0, 0.5, 0.5, 0.25, 40
    cfg = recipe(**{"dpsgd.noise_multiplier": sigma, "dpsgd.max_grad_norm": clip, "device.lr": lr})
    tr = make_trainer(cfg)
    delta = _noise_only_delta(tr, new_key(), q, n).double()
    # attacker: Opacus' noise from the generator the old code seeded from (seed, round, user)
    _, gen = _old_generator(SEED, ROUND, USER)
    replay = torch.cat([torch.normal(0.0, sigma * clip, size=p.shape, generator=gen).reshape(-1)
                        for p in tr.dpsgd.params]).double()
    guess = -lr * replay / (q * n)
    corr = float(torch.corrcoef(torch.stack([delta, guess]))[0, 1])
    assert abs(corr) < 5 / delta.numel() ** 0.5  # independent: the replay explains nothing
    assert float((delta - guess).norm()) > float(delta.norm())  # subtracting the guess only adds noise


def test_replaying_the_old_poisson_batches_does_not_match():
    """The Poisson batch choice is keyed too: the old seed-derived numpy draws do not predict it."""
    cfg = recipe(**{"dpsgd.sample_rate": 0.3})
    tr = make_trainer(cfg)
    seen: list[int] = []
    real = tr.dpsgd._step

    def spy(inputs, targets, mask, gen):
        seen.append(int(inputs.shape[0]))
        return real(inputs, targets, mask, gen)

    tr.dpsgd._step = spy  # type: ignore[method-assign]
    sents = sentences(30)
    key = new_key()
    tr.train(USER, sents, key)
    src = dpsgd_random(key)
    steps = int(tr.dpsgd.last_metrics["device_dp_steps"])
    secure = [src.bernoulli(t, 30, 0.3, "poisson") for t in range(steps)]
    assert seen == [b.size for b in secure if b.size > 0]  # the batches trained on are the keyed draws
    rng, _ = _old_generator(SEED, ROUND, USER)  # the old code's next draws were these Poisson masks
    old = [np.flatnonzero(rng.random(30) < 0.3) for _ in range(steps)]
    assert all(not np.array_equal(a, b) for a, b in zip(old, secure))


def test_device_setup_is_keyed_and_refuses_a_seed():
    sents = sentences(40)
    k = new_key()
    a = device_setup(sents, k, 10, 12)
    b = device_setup(sents, k, 10, 12)
    c = device_setup(sents, new_key(), 10, 12)
    assert torch.equal(a[2], b[2]) and not torch.equal(a[2], c[2])  # subset: same key same, new key different
    assert torch.equal(torch.randint(0, 1 << 30, (4,), generator=a[1]),
                       torch.randint(0, 1 << 30, (4,), generator=b[1]))
    for bad in (SEED, b"short", "x" * 32):
        with pytest.raises(ConfigError, match="device_key must be 32 secret bytes"):
            device_setup(sents, bad, 10, 12)  # type: ignore[arg-type]


def test_reproducible_mode_key_matches_the_simulator_recipe():
    """privacy.reproducible: the Flower node's key is subkey(derive_key(seed), "device", round, user)."""
    from types import SimpleNamespace

    from pflm.errors import PflmError
    from pflm.flower.device import device_key
    from pflm.flower.policy import NodePolicy

    cfg = recipe()
    setattr(cfg.privacy, "reproducible", True)
    spec = DeviceSpec.from_recipe(cfg, VOCAB)
    node = SimpleNamespace(spec=spec, policy=NodePolicy(allow_reproducible=True))
    assert device_key(node, SEED, ROUND, USER) == subkey(derive_key(SEED), "device", ROUND, USER)
    node.policy = NodePolicy()  # a node that does not allow seed-derived keys refuses instead
    with pytest.raises(PflmError, match="does not allow"):
        device_key(node, SEED, ROUND, USER)
    setattr(cfg.privacy, "reproducible", False)
    node.spec = DeviceSpec.from_recipe(cfg, VOCAB)
    k1, k2 = device_key(node, SEED, ROUND, USER), device_key(node, SEED, ROUND, USER)
    assert k1 != k2 and len(k1) == 32  # fresh per call
