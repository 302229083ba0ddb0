"""Validated model and LoRA configuration dataclasses, shared by recipes, devices and the server."""

from __future__ import annotations

from dataclasses import dataclass, field

from pflm.errors import ConfigError

ARCHS = ("lstm", "transformer")
LORA_TARGETS = ("rnn", "attn", "ffn", "proj")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"model.{name} must be a positive integer, got {value!r}; set it to e.g. 128")


@dataclass
class LoraConfig:
    """Low-rank adapters. rank=0 disables LoRA; the adapter scale is alpha / rank.

    targets: layer families that get adapters: "rnn" (LSTM weight_ih/weight_hh), "attn" (q/k/v/o),
    "ffn" (transformer fc1/fc2), "proj" (the hidden<->embedding projections `in_proj`/`proj`).
    """

    rank: int = 0
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ConfigError(f"model.lora.rank must be an integer >= 0 (0 = off), got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ConfigError(f"model.lora.alpha must be a positive number, got {self.alpha!r}; e.g. 16")
        self.alpha = float(self.alpha)
        if isinstance(self.targets, str):
            self.targets = [self.targets]
        if not isinstance(self.targets, (list, tuple)) or not self.targets:
            raise ConfigError(f"model.lora.targets must be a non-empty list from {list(LORA_TARGETS)}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad:
            raise ConfigError(f"model.lora.targets has unknown name(s) {bad}; choose from {list(LORA_TARGETS)}")
        self.targets = list(dict.fromkeys(self.targets))

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.rank > 0 else 0.0


@dataclass
class ModelConfig:
    """Language model shape.

    LSTM: embedding_dim -> LSTM(hidden_dim, num_layers) -> output.
    Transformer: d_model = hidden_dim; if embedding_dim != hidden_dim an `in_proj` Linear maps E -> H.
    Tied embeddings: the output weight is embedding.weight; if hidden_dim != embedding_dim a `proj` Linear
    maps H -> E before the output, so features are E-dimensional.
    """

    arch: str = "lstm"
    embedding_dim: int = 128
    hidden_dim: int = 256
    num_layers: int = 1
    num_heads: int = 4
    ff_dim: int = 512
    max_len: int = 128
    dropout: float = 0.0
    tie_embeddings: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError(f"model.arch must be one of {list(ARCHS)}, got {self.arch!r}")
        for name in ("embedding_dim", "hidden_dim", "num_layers", "num_heads", "ff_dim", "max_len"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout!r}")
        self.dropout = float(self.dropout)
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"model.tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.arch == "transformer" and self.hidden_dim % self.num_heads != 0:
            raise ConfigError(
                f"model.num_heads={self.num_heads} must divide model.hidden_dim={self.hidden_dim} (the transformer"
                f" d_model); pick e.g. num_heads={_divisor_hint(self.hidden_dim, self.num_heads)}")
        if isinstance(self.lora, dict):
            self.lora = LoraConfig(**self.lora)
        if not isinstance(self.lora, LoraConfig):
            raise ConfigError(f"model.lora must be a LoraConfig mapping, got {type(self.lora).__name__}")

    @property
    def output_dim(self) -> int:
        """Dimension of `features()` (H_out): embedding_dim when tied, else hidden_dim."""
        return self.embedding_dim if self.tie_embeddings else self.hidden_dim

    @property
    def has_proj(self) -> bool:
        """Whether a hidden -> embedding `proj` Linear sits before the (tied) output layer."""
        return self.tie_embeddings and self.hidden_dim != self.embedding_dim

    @property
    def has_in_proj(self) -> bool:
        """Whether the transformer maps embeddings (E) to d_model (H) with an `in_proj` Linear."""
        return self.arch == "transformer" and self.hidden_dim != self.embedding_dim


def _divisor_hint(d: int, heads: int) -> int:
    divisors = [h for h in range(1, d + 1) if d % h == 0]
    return min(divisors, key=lambda h: (abs(h - heads), h))
