"""The LanguageModel interface every pflm component uses, and `build_model` to make one from a ModelConfig."""

from __future__ import annotations

import torch
from torch import nn

from pflm.model.options import ModelConfig


class LanguageModel(nn.Module):
    """Causal LM: tokens [B,T] -> features [B,T,H_out] -> logits [B,T,V].

    Parameters indexed by vocabulary id (dim 0) are listed by `vocab_parameters()`; a device model for a
    Partial Embedding Update is simply a model built with vocab_size = K selected rows.
    Tied embeddings use one Parameter (`embedding.weight`) for input and output plus `output_bias`;
    untied models have `output` = Linear(H_out -> V).
    """

    cfg: ModelConfig
    vocab_size: int
    dp_compatible: bool

    def __init__(self, cfg: ModelConfig, vocab_size: int, dp_compatible: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.vocab_size = int(vocab_size)
        self.dp_compatible = dp_compatible
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_dim)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        # Hidden -> embedding projection, only for tied models whose hidden size differs from the embedding size.
        self.proj: nn.Module | None = nn.Linear(cfg.hidden_dim, cfg.embedding_dim) if cfg.has_proj else None
        self.output: nn.Linear | None
        if cfg.tie_embeddings:
            self.output = None
            # Registered directly: `output_bias` is also the name of the accessor method (see note below).
            self._parameters["output_bias"] = nn.Parameter(torch.zeros(vocab_size))
        else:
            self.output = nn.Linear(cfg.output_dim, vocab_size, bias=True)

    # ----- subclass hooks -------------------------------------------------------------------------------
    def _body(self, x: torch.Tensor) -> torch.Tensor:
        """Map embedded inputs [B,T,E] to hidden states [B,T,H] causally."""
        raise NotImplementedError

    # ----- public API -----------------------------------------------------------------------------------
    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """Causal features [B,T,H_out] (H_out = embedding_dim if tied else hidden_dim)."""
        x = self.dropout(self.embedding(tokens))
        h = self._body(x)
        if self.proj is not None:
            h = self.proj(h)
        return self.dropout(h)

    def output_weight(self) -> torch.Tensor:
        """Output embedding matrix [V, H_out] (the input embedding when tied)."""
        if self.output is None:
            return self.embedding.weight
        return self.output.weight

    def output_bias(self) -> torch.Tensor:  # type: ignore[override]
        """Output bias [V]."""
        if self.output is None:
            return self._parameters["output_bias"]  # type: ignore[return-value]
        assert self.output.bias is not None
        return self.output.bias

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Full-softmax logits [..., V] for features [..., H_out]."""
        if self.output is not None:
            return self.output(features)
        return nn.functional.linear(features, self.embedding.weight, self._parameters["output_bias"])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.features(tokens)
        if (self.output is None and self.training and torch.is_grad_enabled()
                and getattr(self, "autograd_grad_sample_hooks", None)):
            # Opacus hooks are attached (GradSampleModule): keep the features for the tied-head grad sampler.
            stack = self.__dict__.setdefault("_dp_feature_stack", [])
            stack.append(h.detach())
            del stack[:-64]  # bounded if hooks are disabled and no backward pops it
        return self.logits(h)

    def vocab_parameters(self) -> dict[str, int]:
        """Names of parameters indexed by vocabulary id -> the indexed dim (always 0)."""
        if self.output is None:
            return {"embedding.weight": 0, "output_bias": 0}
        return {"embedding.weight": 0, "output.weight": 0, "output.bias": 0}

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


# `output_bias` is both a method (API) and a registered parameter name for tied models. nn.Module.__getattr__
# only runs when normal lookup fails, and the method is found first, so `model.output_bias()` always works and
# the parameter is reachable as `model._parameters["output_bias"]` / via named_parameters() / state_dict().


def _tied_head_grad_sampler(layer: LanguageModel, activations: list[torch.Tensor],
                            backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Opacus per-sample grads of a tied model's own head: output_bias and the output use of embedding.weight
    (the lookup use is added by Opacus' nn.Embedding sampler; Opacus sums the two). backprops = dLoss/dlogits."""
    stack = layer.__dict__.get("_dp_feature_stack") or []
    if not stack:
        raise RuntimeError("tied-head grad sampler found no stored features; call the model (forward) under "
                           "Opacus, not features() + output_weight()")
    h = stack.pop()
    ret: dict[nn.Parameter, torch.Tensor] = {}
    bias = layer._parameters.get("output_bias")
    if bias is not None and bias.requires_grad:
        ret[bias] = torch.einsum("n...k->nk", backprops)
    weight = layer.embedding.weight
    if weight.requires_grad:
        ret[weight] = torch.einsum("n...v,n...h->nvh", backprops, h.to(backprops.dtype))
    return ret


_OPACUS_REGISTERED = False


def register_opacus_grad_samplers() -> None:
    """Teach Opacus (hooks mode) the per-sample gradient of tied models' output head (idempotent)."""
    global _OPACUS_REGISTERED
    if _OPACUS_REGISTERED:
        return
    from opacus.grad_sample import register_grad_sampler

    from pflm.model.lstm import LSTMLanguageModel
    from pflm.model.transformer import TransformerLanguageModel
    register_grad_sampler([LSTMLanguageModel, TransformerLanguageModel])(_tied_head_grad_sampler)
    _OPACUS_REGISTERED = True


def build_model(cfg: ModelConfig, vocab_size: int, dp_compatible: bool = False,
                fused_dp_lstm: bool = False) -> LanguageModel:
    """Build an LSTM or Transformer LM; with dp_compatible=True only Opacus-supported layers are used.

    fused_dp_lstm (with dp_compatible, LSTM only): run the DPLSTM's parameters through the fused kernel and
    whole-sequence Linears (pflm.model.fused_dplstm: same per-sample gradients, several times faster).

    If cfg.lora.rank > 0, LoRA adapters are applied (base weights frozen; see pflm.model.lora.apply_lora).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        from pflm.errors import ConfigError
        raise ConfigError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    model: LanguageModel
    if cfg.arch == "lstm":
        from pflm.model.lstm import LSTMLanguageModel
        model = LSTMLanguageModel(cfg, vocab_size, dp_compatible=dp_compatible,
                                  fused_dp_lstm=fused_dp_lstm and dp_compatible)
    else:
        from pflm.model.transformer import TransformerLanguageModel
        model = TransformerLanguageModel(cfg, vocab_size, dp_compatible=dp_compatible)
    if dp_compatible:
        register_opacus_grad_samplers()
    if cfg.lora.enabled:
        from pflm.model.lora import apply_lora
        apply_lora(model, cfg.lora)
    return model
