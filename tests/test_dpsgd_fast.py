"""Fast ghost clipping (pflm.device.dp_fast): the clipped per-sentence gradient sum equals Opacus' own per-sample
gradients clipped by hand; padding never reaches the norms; the released step is that sum plus the same keyed noise
as Opacus' two-pass ghost path."""

from __future__ import annotations

import pytest
import torch

from pflm.config import load_recipe
from pflm.device.batching import pack_sentences
from pflm.device.dp_fast import packed_clipped_step
from pflm.device.dpsgd import NOISE_PURPOSE, dpsgd_random
from pflm.secure_random import new_key
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"

CASES = {  # name -> overrides on top of dpsgd on, σ = 0
    "full": {},
    "sampled_peu": {"device.loss": "sampled_softmax", "peu.mode": "topk", "peu.k": 60},
    "nce_peu_lora_emb": {"device.loss": "nce", "peu.mode": "topk", "peu.k": 60, "model.lora.rank": 4,
                         "device.train_embeddings": "true"},
    "full_lora_frozen_head": {"model.lora.rank": 4, "device.train_embeddings": "false"},
    "full_2layers": {"model.num_layers": 2},
    "full_opacus_dplstm": {"dpsgd.fused_lstm": "false"},  # Opacus' step-by-step DPLSTM: one record per time step
    "nce_transformer": {"device.loss": "nce", "model.arch": "transformer", "model.num_layers": 1},
}


def make_sim(data: str, tmp_path, sub: str, **extra) -> Simulator:
    base = {"dpsgd.enabled": "true", "dpsgd.noise_multiplier": 0.0, "dpsgd.max_grad_norm": 1.0,
            "device.num_samples": 16, "model.tie_embeddings": "false"}
    base.update(extra)
    return Simulator(load_recipe(RECIPE, tiny_overrides(data, str(tmp_path / sub), **base)))


def _pair(data, tmp_path, ref_mode: str, **extra):
    """(fast ghost sim, reference sim with `ref_mode`) holding the same weights, round 0 loaded in both."""
    fast = make_sim(data, tmp_path, "fast", **{"dpsgd.grad_sample_mode": "ghost", **extra})
    ref_extra = {"dpsgd.fast_ghost": "false"} if ref_mode == "ghost" else {}
    ref = make_sim(data, tmp_path, "ref", **{"dpsgd.grad_sample_mode": ref_mode, **ref_extra, **extra})
    plan = fast.server.plan_round(0)
    ref.fanout.trainer.model.load_state_dict(fast.fanout.trainer.model.state_dict())
    for sim in (fast, ref):
        sim.fanout.trainer.load_round(0, plan.device_state, plan.rows)
        sim.fanout.trainer.model.train()
    assert fast.fanout.trainer.dpsgd.fast and not ref.fanout.trainer.dpsgd.fast
    user = max(plan.cohort, key=lambda u: len(fast.fd.user_tokens("train", u)))
    return fast, ref, user


def _batch(sim: Simulator, user: int, n: int = 7):
    seqs, lengths = pack_sentences(sim.fd.user_tokens("train", user)[:n], sim.cfg.data.max_tokens)
    inputs, targets, mask = sim.fanout.trainer.local_vocab.batch(seqs, lengths)
    assert not bool(mask.all()) and len(set(mask.sum(1).tolist())) > 1, "the batch must be ragged"
    return inputs, targets, mask


def _fast_step(sim: Simulator, inputs, targets, mask, clip: float, seed: int = 7, bookkeep: bool = True):
    tr, dp = sim.fanout.trainer, sim.fanout.trainer.dpsgd
    noise = dp._noise_words(torch.Generator().manual_seed(seed))
    for p in tr.trainable:
        p.grad = None
    per_seq, norms = packed_clipped_step(tr.model, tr.trainable, dp.gsm, clip, inputs, targets, mask, noise,
                                         tr.loss_cfg.kind, tr.sampler, tr.loss_cfg.nce_log_z,
                                         dp.recorder if bookkeep else None)
    grads = torch.cat([p.grad.reshape(-1) for p in tr.trainable])
    for p in tr.trainable:
        p.grad = None
    return per_seq, norms, grads


@pytest.mark.parametrize("case", list(CASES))
def test_clipped_sum_equals_opacus_per_sample_gradients(synthetic_data, tmp_path, case):
    fast, ref, user = _pair(synthetic_data, tmp_path, "hooks", **CASES[case])
    inputs, targets, mask = _batch(fast, user)
    # Opacus' own per-sample gradients (GradSampleModule hooks), same noise words
    rtr, rdp = ref.fanout.trainer, ref.fanout.trainer.dpsgd
    per_seq_ref = rdp.gsm(inputs, targets, mask, rdp._noise_words(torch.Generator().manual_seed(7)))
    per_seq_ref.mean().backward()
    gs = rdp.optimizer.grad_samples
    assert len(gs) == len(rtr.trainable)
    flat = torch.cat([g.reshape(inputs.shape[0], -1) for g in gs], dim=1)
    rdp.optimizer.zero_grad(set_to_none=True)
    ref_norms = flat.norm(dim=1)
    clip = float(ref_norms.median())  # some sentences clipped, some (c_i = 1) not
    assert bool((ref_norms < clip).any()) and bool((ref_norms > clip).any())
    want = ((clip / (ref_norms + 1e-6)).clamp(max=1.0).unsqueeze(1) * flat).sum(0)
    for bookkeep in (True, False):  # body clipped sum book-kept from pass 1, or by a second body backward
        per_seq, norms, got = _fast_step(fast, inputs, targets, mask, clip, bookkeep=bookkeep)
        torch.testing.assert_close(per_seq, per_seq_ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norms, ref_norms, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        if bookkeep:  # LSTM bodies are Linears + Embedding: book-kept; the transformer falls back explicitly
            # Opacus' own DPLSTM has no ghost norm sampler for its per-step Linears: the body is not recorded
            assert fast.fanout.trainer.dpsgd.recorder.bookkept == (case not in {"nce_transformer",
                                                                                "full_opacus_dplstm"})
    # a bound above every norm: the plain sum of per-sentence gradients
    _, _, unclipped = _fast_step(fast, inputs, targets, mask, 1e6)
    torch.testing.assert_close(unclipped, flat.sum(0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("case", ["full", "sampled_peu"])
def test_padding_never_leaks(synthetic_data, tmp_path, case):
    fast, _, user = _pair(synthetic_data, tmp_path, "hooks", **CASES[case])
    inputs, targets, mask = _batch(fast, user)
    per_seq, norms, grads = _fast_step(fast, inputs, targets, mask, 0.05)
    g = torch.Generator().manual_seed(3)
    vocab = fast.fanout.trainer.model.output_weight().shape[0]
    seqs, lengths = pack_sentences(fast.fd.user_tokens("train", user)[:7], fast.cfg.data.max_tokens)
    pad_in = torch.arange(inputs.shape[1]).unsqueeze(0) >= (lengths - 1).unsqueeze(1)  # inputs after the end
    assert bool(pad_in.any()) and not bool((pad_in & mask).any())
    inputs2 = torch.where(pad_in, torch.randint(4, vocab, inputs.shape, generator=g), inputs)
    targets2 = torch.where(~mask, torch.randint(4, vocab, targets.shape, generator=g), targets)
    assert not torch.equal(inputs2, inputs) and not torch.equal(targets2, targets)
    per_seq2, norms2, grads2 = _fast_step(fast, inputs2, targets2, mask, 0.05)
    torch.testing.assert_close(per_seq2, per_seq, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(norms2, norms, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads2, grads, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("case", ["full", "nce_peu_lora_emb"])
def test_noised_step_equals_opacus_ghost_with_the_same_key(synthetic_data, tmp_path, case):
    sigma, clip, lr = 1.0, 0.05, 0.5
    extra = {**CASES[case], "dpsgd.noise_multiplier": sigma, "dpsgd.max_grad_norm": clip, "device.lr": lr}
    fast, ref, user = _pair(synthetic_data, tmp_path, "ghost", **extra)
    inputs, targets, mask = _batch(fast, user)
    _, _, clipped = _fast_step(fast, inputs, targets, mask, clip, seed=11)  # the clipped sum, before any step
    key = new_key()
    deltas, losses, norms = [], [], []
    for sim in (fast, ref):
        tr, dp = sim.fanout.trainer, sim.fanout.trainer.dpsgd
        before = [p.detach().clone() for p in tr.trainable]
        dp._reset(0.5, 14, key)  # expected batch size 7
        per_seq, nrm = dp._step(inputs, targets, mask, torch.Generator().manual_seed(11))
        deltas.append(torch.cat([(p.detach() - b).reshape(-1) for p, b in zip(tr.trainable, before)]))
        losses.append(per_seq)
        norms.append(nrm)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norms[0], norms[1], rtol=1e-4, atol=1e-6)
    assert bool((norms[0] > clip).any())
    torch.testing.assert_close(deltas[0], deltas[1], rtol=1e-4, atol=1e-6)  # same key -> same noise, same step
    # SGD: delta = -lr (clipped sum + noise) / E, the noise being step 0 of the device key's float32 stream
    noise = dpsgd_random(key).normal_f32(0, deltas[0].numel(), sigma * clip, NOISE_PURPOSE)
    torch.testing.assert_close(deltas[0], -lr * (clipped + noise) / 7.0, rtol=1e-5, atol=1e-6)
    other = dpsgd_random(new_key()).normal_f32(0, deltas[0].numel(), sigma * clip, NOISE_PURPOSE)
    # another key's noise is off by at least one noise std somewhere
    assert float((deltas[0] + lr * (clipped + other) / 7.0).abs().max()) > lr * sigma * clip / 7.0


def test_whole_device_run_matches_opacus_ghost(synthetic_data, tmp_path):
    extra = {"device.loss": "sampled_softmax", "dpsgd.noise_multiplier": 1.0, "dpsgd.max_grad_norm": 0.1}
    fast, ref, user = _pair(synthetic_data, tmp_path, "ghost", **extra)
    key = new_key()
    sents = fast.fd.user_tokens("train", user)
    a = fast.fanout.trainer.train(user, sents, key)
    b = ref.fanout.trainer.train(user, sents, key)
    assert a.metrics["local_steps"] == b.metrics["local_steps"] > 1
    assert a.metrics["device_dp_empty_batches"] == b.metrics["device_dp_empty_batches"]
    torch.testing.assert_close(a.update, b.update, rtol=1e-4, atol=1e-5)
    assert a.train_loss == pytest.approx(b.train_loss, rel=1e-4)


def test_tied_head_falls_back_to_opacus_ghost(synthetic_data, tmp_path):
    sim = make_sim(synthetic_data, tmp_path, "tied", **{"dpsgd.grad_sample_mode": "ghost", "model.tie_embeddings":
                                                        "true", "model.lora.rank": 4,
                                                        "device.train_embeddings": "false"})
    assert not sim.fanout.trainer.dpsgd.fast  # the documented fallback: Opacus' two-pass ghost clipping
    off = make_sim(synthetic_data, tmp_path, "off", **{"dpsgd.grad_sample_mode": "ghost", "dpsgd.fast_ghost": "false"})
    assert not off.fanout.trainer.dpsgd.fast


def test_first_pass_asks_one_cheap_parameter_per_module(synthetic_data, tmp_path):
    from pflm.device.dp_fast import _pass1_targets

    sim = make_sim(synthetic_data, tmp_path, "p1", **{"dpsgd.grad_sample_mode": "ghost", "model.num_layers": 2})
    lm = sim.fanout.trainer.model
    head = {id(lm.output_weight()), id(lm.output_bias())}
    body = [p for p in sim.fanout.trainer.trainable if id(p) not in head]
    got = {id(p) for p in _pass1_targets(lm, body)}
    cells = [getattr(lm.rnn, f"l{k}") for k in range(2)]
    # the LSTM's weight products are left to the book-keeping; its biases reach every hooked Linear
    assert got == {id(lm.embedding.weight)} | {id(getattr(c, kind).bias) for c in cells for kind in ("ih", "hh")}


def test_bookkeeping_sums_every_call_of_a_module():
    """A Linear called twice in one forward leaves two (activations, backprops) records; its clipped gradient is
    the sum over both calls (keeping only the last call's would release a partial gradient whose norm the clip
    bound does not cover)."""
    from pflm.device.dp_fast import _bookkept_body

    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    a1, a2 = torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    g1, g2 = torch.randn(4, 5, 2), torch.randn(4, 5, 2)
    coef = torch.tensor([1.0, 0.5, 0.25, 0.0])
    gw, gb = _bookkept_body([(lin, [a1], g1), (lin, [a2], g2)], [lin.weight, lin.bias], coef)
    c = coef.view(4, 1, 1)
    want_w = torch.einsum("btk,bth->kh", c * g1, a1) + torch.einsum("btk,bth->kh", c * g2, a2)
    torch.testing.assert_close(gw, want_w)
    torch.testing.assert_close(gb, (c * g1).sum((0, 1)) + (c * g2).sum((0, 1)))
