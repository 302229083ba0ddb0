"""LoRA: exact trainable-parameter counts, merge equivalence, training on the fused LSTM, Opacus per-sample grads."""

from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from pflm.errors import ConfigError
from pflm.model.options import LoraConfig, ModelConfig
from pflm.model.factory import build_model
from pflm.model.lora import (apply_lora, count_lora_parameters, expected_lora_parameter_count,
                             lora_parameter_names, lora_state_dict, merge_lora, set_trainable,
                             trainable_parameter_names)

V = 23


def cfg_for(arch: str, tie: bool, layers: int = 2, rank: int = 3, targets: list[str] | None = None) -> ModelConfig:
    lora = LoraConfig(rank=rank, alpha=6.0, targets=targets or ["rnn", "attn", "ffn", "proj"])
    return ModelConfig(arch=arch, embedding_dim=8, hidden_dim=12, num_layers=layers, num_heads=3, ff_dim=16,
                       max_len=16, tie_embeddings=tie, lora=lora)


def randomize_adapters(model: torch.nn.Module, std: float = 0.1) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n in lora_parameter_names(model):
            params[n].normal_(0.0, std)


def test_parameter_count_formula_by_hand() -> None:
    # LSTM E=8, H=12, L=2, r=3: layer 0: 3*((8+48)+(12+48)) = 348; layer 1: 3*((12+48)+(12+48)) = 360.
    assert count_lora_parameters(build_model(cfg_for("lstm", False), V)) == 708
    # + proj (tied, 12 -> 8): 3*(12+8) = 60.
    assert count_lora_parameters(build_model(cfg_for("lstm", True), V)) == 768
    # Transformer H=12, F=16, L=2, r=3: attn 2*4*3*24 = 576, ffn 2*2*3*28 = 336, in_proj 3*20 = 60.
    assert count_lora_parameters(build_model(cfg_for("transformer", False), V)) == 972
    assert count_lora_parameters(build_model(cfg_for("transformer", False, targets=["ffn"]), V)) == 336


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dp", [False, True])
@pytest.mark.parametrize("layers,rank", [(1, 1), (2, 4)])
def test_trainable_count_matches_formula(arch: str, tie: bool, dp: bool, layers: int, rank: int) -> None:
    cfg = cfg_for(arch, tie, layers, rank)
    model = build_model(cfg, V, dp_compatible=dp)
    expected = expected_lora_parameter_count(cfg)
    assert count_lora_parameters(model) == expected > 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected  # everything but the adapters is frozen
    assert set(trainable_parameter_names(model)) == set(lora_parameter_names(model))


@pytest.mark.parametrize("arch", ["lstm", "transformer"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dp", [False, True])
def test_fresh_adapters_are_identity_and_merge_is_equivalent(arch: str, tie: bool, dp: bool, tmp_path) -> None:
    torch.manual_seed(0)
    cfg = cfg_for(arch, tie)
    plain = build_model(ModelConfig(**{**cfg.__dict__, "lora": LoraConfig()}), V, dp_compatible=dp).eval()
    base_keys = list(plain.state_dict())
    model = build_model(ModelConfig(**{**cfg.__dict__, "lora": LoraConfig()}), V, dp_compatible=dp).eval()
    model.load_state_dict(plain.state_dict())
    apply_lora(model, cfg.lora)
    tokens = torch.randint(0, V, (3, 7))
    with torch.no_grad():
        assert torch.allclose(model(tokens), plain(tokens), atol=1e-6)  # B = 0 at init
        randomize_adapters(model)
        adapted = model(tokens)
        assert not torch.allclose(adapted, plain(tokens), atol=1e-3)
    # Save / load a LoRA model through safetensors.
    sd = model.state_dict()
    assert len({t.data_ptr() for t in sd.values()}) == len(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "lora.safetensors"))
    clone = build_model(cfg, V, dp_compatible=dp).eval()
    clone.load_state_dict(load_file(str(tmp_path / "lora.safetensors")))
    with torch.no_grad():
        assert torch.equal(clone(tokens), adapted)
        merge_lora(model)
        assert count_lora_parameters(model) == 0 and list(model.state_dict()) == base_keys
        assert torch.allclose(model(tokens), adapted, atol=1e-5)
    assert set(lora_state_dict(clone)) == set(lora_parameter_names(clone))


@pytest.mark.parametrize("tie", [False, True])
def test_fused_and_dplstm_lora_share_names_and_outputs(tie: bool) -> None:
    torch.manual_seed(1)
    cfg = cfg_for("lstm", tie)
    fused, dp = build_model(cfg, V), build_model(cfg, V, dp_compatible=True)
    assert list(fused.state_dict()) == list(dp.state_dict())
    assert lora_parameter_names(fused) == lora_parameter_names(dp)
    randomize_adapters(fused)
    dp.load_state_dict(fused.state_dict())
    tokens = torch.randint(0, V, (2, 9))
    assert torch.allclose(fused(tokens), dp(tokens), atol=1e-5)


def test_lora_on_fused_lstm_trains_and_leaves_base_untouched() -> None:
    torch.manual_seed(0)
    cfg = cfg_for("lstm", False, layers=1, rank=4, targets=["rnn"])
    model = build_model(cfg, V)
    with torch.no_grad():  # a "pretrained" base with a usable output range; only the LSTM adapters train
        model.output.weight.normal_(0.0, 1.0)
        model.embedding.weight.normal_(0.0, 1.0)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    tokens = (torch.arange(12)[None, :] + torch.randint(0, V, (8, 1))) % V  # next token = token + 1
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.03)
    losses = []
    for _ in range(40):
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, V), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), n


def test_fused_lstm_lora_gradients_equal_dplstm_lora_gradients() -> None:
    torch.manual_seed(2)
    cfg = cfg_for("lstm", True, layers=2, rank=2)
    fused, dp = build_model(cfg, V), build_model(cfg, V, dp_compatible=True)
    randomize_adapters(fused)
    dp.load_state_dict(fused.state_dict())
    tokens = torch.randint(0, V, (3, 8))
    grads = []
    for model in (fused, dp):
        F.cross_entropy(model(tokens[:, :-1]).transpose(1, 2), tokens[:, 1:]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 2 * 2 + 2
    for n in grads[0]:
        assert grads[0][n].abs().sum() > 0 and torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


def test_lora_errors_and_set_trainable() -> None:
    model = build_model(cfg_for("lstm", False), V)
    with pytest.raises(ConfigError, match="already has LoRA"):
        apply_lora(model, LoraConfig(rank=2))
    with pytest.raises(ConfigError, match="match no layer"):
        build_model(cfg_for("transformer", False, targets=["rnn"]), V)
    with pytest.raises(ConfigError, match="rank > 0"):
        apply_lora(build_model(ModelConfig(), V), LoraConfig(rank=0))
    assert set_trainable(model, ["embedding.weight", "output."]) == ["embedding.weight", "output.weight",
                                                                     "output.bias"]
    assert {"embedding.weight", "output.bias"} <= set(trainable_parameter_names(model))
    set_trainable(model, lambda n: "lora_" in n, exclusive=True)
    assert set(trainable_parameter_names(model)) == set(lora_parameter_names(model))
    with pytest.raises(ConfigError, match="no parameter named"):
        set_trainable(model, ["embeding.weight"])


OPACUS_CASES = [(arch, tie, rank) for arch in ("lstm", "transformer") for tie in (False, True) for rank in (0, 2)]


@pytest.mark.parametrize("arch,tie,rank", OPACUS_CASES)
def test_opacus_per_sample_gradients_are_exact(arch: str, tie: bool, rank: int) -> None:
    from opacus import GradSampleModule

    torch.manual_seed(0)
    cfg = cfg_for(arch, tie, layers=1, rank=rank)
    model = build_model(cfg, V, dp_compatible=True)
    if rank:
        set_trainable(model, list(model.vocab_parameters()))  # PEU-style: adapters + vocab rows
        randomize_adapters(model)
    tokens = torch.randint(0, V, (3, 6))
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[2, 3:] = False

    def per_seq_loss(logits: torch.Tensor, idx: slice) -> torch.Tensor:
        ce = F.cross_entropy(logits.transpose(1, 2), tokens[idx, 1:], reduction="none")
        m = mask[idx].float()
        return (ce * m).sum(1) / m.sum(1)

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    reference = {}
    for i in range(3):
        model.zero_grad()
        per_seq_loss(model(tokens[i:i + 1, :-1]), slice(i, i + 1)).sum().backward()
        reference[i] = {n: p.grad.detach().clone() for n, p in trainable.items()}
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
        per_seq_loss(gsm(tokens[:, :-1]), slice(0, 3)).sum().backward()
    for n, p in trainable.items():
        assert getattr(p, "grad_sample", None) is not None, f"no per-sample grad for {n}"
        for i in range(3):
            assert torch.allclose(p.grad_sample[i], reference[i][n], atol=1e-5), (n, i)
    gsm._close()
