"""The fused DP-LSTM (pflm.model.fused_dplstm) and the pruned ghost backward (pflm.device.ghost) give Opacus' results.

Reference: Opacus' own DPLSTM (step-by-step cell, RNNLinear hooks) with Opacus' GradSampleModule (hooks mode:
per-sample gradients) and GradSampleModuleFastGradientClipping + DPTensorFastGradientClipping (ghost clipping,
Li et al. 2022 / Bu et al. 2023 as implemented in Opacus 1.6). Tolerances: float64 models, 1e-10 relative (the
two paths sum the same products in a different order); the float32 device update 1e-4 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

from pflm.config import load_recipe
from pflm.device.ghost import ghost_clipped_backward
from pflm.device.spec import DeviceSpec
from pflm.device.trainer import DeviceTrainer
from pflm.model.options import ModelConfig
from pflm.model.factory import build_model
from pflm.model.fused_dplstm import is_fused
from pflm.secure_random import new_key

V = 40


def _pair(layers: int, lora: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(Opacus DPLSTM model, fused model) in float64 with identical weights (LoRA B non-zero so it matters)."""
    torch.manual_seed(layers * 10 + lora)
    cfg = ModelConfig(embedding_dim=6, hidden_dim=5, num_layers=layers,
                      lora={"rank": lora, "targets": ["rnn"]} if lora else {"rank": 0})
    ref = build_model(cfg, V, dp_compatible=True).double()
    fused = build_model(cfg, V, dp_compatible=True, fused_dp_lstm=True).double()
    assert is_fused(fused.rnn) and not is_fused(ref.rnn)
    with torch.no_grad():
        for (na, pa), (nb, pb) in zip(ref.named_parameters(), fused.named_parameters(), strict=True):
            assert na == nb
            if "lora_B" in na:
                pa.normal_(0, 0.3)
            pb.copy_(pa)
    return ref, fused


def _batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randint(4, V, (5, 9), generator=g)
    y = torch.randint(4, V, (5, 9), generator=g)
    mask = torch.arange(9).unsqueeze(0) < torch.tensor([9, 4, 7, 1, 6]).unsqueeze(1)  # padded sentences
    return x, y, mask


def _per_seq_loss(model, x, y, mask):
    tok = torch.nn.functional.cross_entropy(model(x).transpose(1, 2), y, reduction="none")
    return (tok * mask).sum(1) / mask.sum(1)


@pytest.mark.parametrize("layers,lora", [(1, 0), (2, 0), (1, 3)])
def test_per_sample_gradients_equal_opacus_dplstm(layers, lora):
    """Hooks mode: every trainable parameter's per-sample gradient [B, ...] equals Opacus' DPLSTM one."""
    x, y, mask = _batch()
    got = []
    for model in _pair(layers, lora):
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        _per_seq_loss(gsm, x, y, mask).sum().backward()
        got.append({n: p.grad_sample.clone() for n, p in model.named_parameters() if p.requires_grad})
        gsm._close()
    ref, fused = got
    assert sorted(ref) == sorted(fused) and any("rnn" in n for n in ref)
    for n in ref:
        assert float(ref[n].abs().max()) > 0, n  # non-trivial (LoRA B is non-zero, so lora_A has a gradient)
        torch.testing.assert_close(fused[n], ref[n], rtol=1e-10, atol=1e-12, msg=n)


@pytest.mark.parametrize("layers,lora", [(1, 0), (2, 3)])
def test_ghost_norms_and_clipped_gradient_equal_opacus(layers, lora):
    """Ghost clipping: the per-sample norms and the clipped summed gradient of the fused model with pflm's pruned
    first pass equal Opacus' DPLSTM with Opacus' DPTensorFastGradientClipping (and the clip bound binds)."""
    x, y, mask = _batch()
    clip = 0.05
    out = []
    for model, pflm_path in zip(_pair(layers, lora), (False, True)):
        params = [p for p in model.parameters() if p.requires_grad]
        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                   max_grad_norm=clip, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0,
                                              max_grad_norm=clip, expected_batch_size=5, loss_reduction="mean")
        per_seq = _per_seq_loss(gsm, x, y, mask)
        if pflm_path:
            ghost_clipped_backward(gsm, opt, per_seq, skip=[model.output.weight, model.output.bias])
        else:
            DPTensorFastGradientClipping(gsm, opt, per_seq, "mean").backward()
        norms = gsm.per_sample_gradient_norms.detach().clone()
        out.append((norms, [p.grad.clone() for p in params]))
        gsm._close()
    (n_ref, g_ref), (n_got, g_got) = out
    assert bool((n_ref > clip).any()) and bool((n_ref < clip * 20).all())
    torch.testing.assert_close(n_got, n_ref, rtol=1e-10, atol=0)
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def _device_update(fused: bool, mode: str, key: bytes) -> torch.Tensor:
    cfg = load_recipe(None, ["model.embedding_dim=8", "model.hidden_dim=12", "device.batch_size=4", "device.lr=0.5",
                             "dpsgd.enabled=true", f"dpsgd.grad_sample_mode={mode}", "dpsgd.noise_multiplier=1.0",
                             "dpsgd.max_grad_norm=0.1", f"dpsgd.fused_lstm={str(fused).lower()}",
                             "data.max_tokens=12", "threads=1"])
    torch.manual_seed(0)
    tr = DeviceTrainer(DeviceSpec.from_recipe(cfg, V), np.ones(V))
    assert is_fused(tr.model.rnn) == fused
    tr.load_round(0, tr.model.state_dict(), None)
    rng = np.random.default_rng(1)
    sentences = [list(rng.integers(4, V, size=int(n))) for n in rng.integers(1, 12, size=10)]
    return tr.train(0, sentences, key).update


@pytest.mark.parametrize("mode", ["ghost", "hooks"])
def test_device_update_equals_opacus_dplstm(mode):
    """A whole device DP-SGD run (Poisson batches, clipping, σ = 1 keyed noise, several steps) gives the same
    update with the fused LSTM as with Opacus' DPLSTM: the noise and its accounting are untouched."""
    key = new_key()
    ref, got = _device_update(False, mode, key), _device_update(True, mode, key)
    assert float(ref.norm()) > 0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)
    other = _device_update(True, mode, new_key())  # and the comparison can fail: another key, another update
    assert not torch.allclose(other, ref, rtol=1e-3, atol=1e-5)


def test_outlier_sentence_is_clipped_on_the_fused_path():
    """Attacker's view: one sentence with a gradient 10^4 times larger (a canary) moves the clipped sum by at most
    2·C; if the fused path under-estimated that sentence's LSTM norm, the canary would show through."""
    x, y, mask = _batch()
    clip = 0.05
    grads = []
    for boost in (1.0, 1e4):
        _, model = _pair(1, 0)
        params = [p for p in model.parameters() if p.requires_grad]
        gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                                   max_grad_norm=clip, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0,
                                              max_grad_norm=clip, expected_batch_size=5, loss_reduction="mean")
        weights = torch.ones(5, dtype=torch.float64)
        weights[2] = boost
        per_seq = _per_seq_loss(gsm, x, y, mask) * weights
        ghost_clipped_backward(gsm, opt, per_seq, skip=[model.output.weight, model.output.bias])
        grads.append(torch.cat([p.grad.reshape(-1) for p in params]))
        gsm._close()
    assert float(grads[1].norm()) <= 5 * clip * (1 + 1e-9)
    assert float((grads[1] - grads[0]).norm()) <= 2 * clip * (1 + 1e-9)
