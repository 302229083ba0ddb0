"""Shapes, causality, naming and DPLSTM equivalence of the pflm language models."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from pflm.errors import ConfigError
from pflm.model.options import LoraConfig, ModelConfig
from pflm.model.factory import LanguageModel, build_model

V = 37


def small_cfg(arch: str, tie: bool, **kw: object) -> ModelConfig:
    base = dict(arch=arch, embedding_dim=8, hidden_dim=12, num_layers=2, num_heads=3, ff_dim=16, max_len=16,
                tie_embeddings=tie)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


CASES = [(arch, tie, dp) for arch in ("lstm", "transformer") for tie in (False, True) for dp in (False, True)]


@pytest.mark.parametrize("arch,tie,dp", CASES)
def test_shapes_and_causality(arch: str, tie: bool, dp: bool) -> None:
    torch.manual_seed(0)
    cfg = small_cfg(arch, tie)
    model = build_model(cfg, V, dp_compatible=dp).eval()
    tokens = torch.randint(0, V, (3, 9))
    h_out = cfg.embedding_dim if tie else cfg.hidden_dim
    assert model.features(tokens).shape == (3, 9, h_out)
    assert model.output_weight().shape == (V, h_out)
    assert model.output_bias().shape == (V,)
    logits = model(tokens)
    assert logits.shape == (3, 9, V)
    assert torch.allclose(logits, model.features(tokens) @ model.output_weight().T + model.output_bias(), atol=1e-5)
    changed = tokens.clone()
    changed[:, 6] = (changed[:, 6] + 1) % V
    logits2 = model(changed)
    assert torch.allclose(logits[:, :6], logits2[:, :6], atol=1e-6)
    assert not torch.allclose(logits[:, 6:], logits2[:, 6:], atol=1e-4)


@pytest.mark.parametrize("arch,tie,dp", CASES)
def test_vocab_parameters_and_state_dict(arch: str, tie: bool, dp: bool, tmp_path) -> None:
    model = build_model(small_cfg(arch, tie), V, dp_compatible=dp)
    params = dict(model.named_parameters())
    sd = model.state_dict()
    vp = model.vocab_parameters()
    expected = {"embedding.weight", "output_bias"} if tie else {"embedding.weight", "output.weight", "output.bias"}
    assert set(vp) == expected
    for name, dim in vp.items():
        assert dim == 0 and params[name].shape[0] == V and name in sd
    # One Parameter per state-dict entry: no aliasing (safetensors refuses shared tensors).
    assert set(sd) == set(params)
    assert len({t.data_ptr() for t in sd.values()}) == len(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "m.safetensors"))
    other = build_model(small_cfg(arch, tie), V, dp_compatible=dp)
    other.load_state_dict(load_file(str(tmp_path / "m.safetensors")))
    tokens = torch.randint(0, V, (2, 5))
    assert torch.equal(other.eval()(tokens), model.eval()(tokens))
    if tie:
        assert model.output_weight() is model.embedding.weight and model.output is None


@pytest.mark.parametrize("tie", [False, True])
def test_fused_lstm_and_dplstm_agree_after_weight_copy(tie: bool) -> None:
    torch.manual_seed(1)
    cfg = small_cfg("lstm", tie)
    fused = build_model(cfg, V)
    dp = build_model(cfg, V, dp_compatible=True)
    assert type(fused.rnn).__name__ == "LSTM" and type(dp.rnn).__name__ == "DPLSTM"
    assert list(fused.state_dict()) == list(dp.state_dict())
    dp.load_state_dict(fused.state_dict())
    tokens = torch.randint(0, V, (4, 11))
    assert torch.allclose(fused(tokens), dp(tokens), atol=1e-5)
    # ...and back, after perturbing the DP copy.
    with torch.no_grad():
        for p in dp.parameters():
            p.add_(0.01 * torch.randn_like(p))
    fused.load_state_dict(dp.state_dict())
    assert torch.allclose(fused(tokens), dp(tokens), atol=1e-5)


def test_transformer_rejects_too_long_sequences() -> None:
    model = build_model(small_cfg("transformer", False, max_len=4), V)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 5, dtype=torch.long))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(arch="gru"), "model.arch"),
    (dict(hidden_dim=0), "model.hidden_dim"),
    (dict(embedding_dim=-3), "model.embedding_dim"),
    (dict(arch="transformer", hidden_dim=10, num_heads=4), "num_heads"),
    (dict(dropout=1.0), "model.dropout"),
    (dict(tie_embeddings="yes"), "tie_embeddings"),
])
def test_model_config_validation(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(rank=-1), "rank"), (dict(rank=2, alpha=0), "alpha"), (dict(rank=2, targets=["mlp"]), "mlp"),
    (dict(rank=2, targets=[]), "targets"),
])
def test_lora_config_validation(kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        LoraConfig(**kwargs)


def test_lora_config_from_dict_and_build_model_validates_vocab() -> None:
    cfg = ModelConfig(lora={"rank": 4, "targets": ["rnn"]})  # type: ignore[arg-type]
    assert isinstance(cfg.lora, LoraConfig) and cfg.lora.scale == 4.0
    with pytest.raises(ConfigError, match="vocab_size"):
        build_model(ModelConfig(), 0)
    assert isinstance(build_model(ModelConfig(embedding_dim=4, hidden_dim=4), 5), LanguageModel)
