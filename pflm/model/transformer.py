"""Causal pre-LayerNorm Transformer LM built from nn.Linear/LayerNorm/Embedding only (Opacus- and LoRA-friendly)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pflm.model.options import ModelConfig
from pflm.model.factory import LanguageModel

INIT_STD = 0.02


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o Linears (no nn.MultiheadAttention)."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.num_heads

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, h, d // h).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), is_causal=True,
                                           dropout_p=self.attn_dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class FeedForward(nn.Module):
    def __init__(self, d_model: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, ff_dim)
        self.fc2 = nn.Linear(ff_dim, d_model)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class Block(nn.Module):
    def __init__(self, d_model: int, num_heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, num_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ff_dim, dropout)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x)))
        return x + self.dropout(self.ffn(self.ln2(x)))


class TransformerLanguageModel(LanguageModel):
    """embedding [V,E] -> (in_proj E->H) + pos_embedding [max_len,H] -> blocks -> ln_f -> (proj H->E if tied) -> output.

    d_model = hidden_dim. Position ids are expanded to the batch dimension (Opacus needs a per-sample input to
    the position embedding). Sequences longer than max_len raise a ValueError.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, dp_compatible: bool = False) -> None:
        super().__init__(cfg, vocab_size, dp_compatible)
        d = cfg.hidden_dim
        self.in_proj: nn.Linear | None = nn.Linear(cfg.embedding_dim, d) if cfg.has_in_proj else None
        self.pos_embedding = nn.Embedding(cfg.max_len, d)
        self.layers = nn.ModuleList(Block(d, cfg.num_heads, cfg.ff_dim, cfg.dropout) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style: N(0, 0.02) for embeddings and Linears, zero biases, residual output Linears scaled by
        1/sqrt(2 * num_layers)."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = INIT_STD
                if name.endswith((".attn.o", ".ffn.fc2")):
                    std = INIT_STD / (2 * self.cfg.num_layers) ** 0.5
                nn.init.normal_(module.weight, 0.0, std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, 0.0, INIT_STD)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if self.output is None:
            nn.init.zeros_(self._parameters["output_bias"])  # type: ignore[arg-type]

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        if t > self.cfg.max_len:
            raise ValueError(f"sequence length {t} exceeds model.max_len={self.cfg.max_len}")
        if self.in_proj is not None:
            x = self.in_proj(x)
        positions = torch.arange(t, device=x.device).unsqueeze(0).expand(b, -1).contiguous()
        x = x + self.pos_embedding(positions)
        for layer in self.layers:
            x = layer(x)
        return self.ln_f(x)
