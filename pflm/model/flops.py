"""Analytic training FLOPs per token of an LM, layer by layer: how far a measured speed is from the hardware.

Counted: the matrix products (2 FLOPs per multiply-add), which are all but a few percent of an LM's arithmetic;
not counted: elementwise work (gate nonlinearities, softmax, bias adds, optimizer), embedding lookups and their
scatter-add gradients. One training token costs a forward product per weight matrix and two backward ones (the
weight gradient and the gradient of the matrix's input); the input gradient of the first layer is needed only
when the embedding trains. The count is per *valid* target token: an implementation that runs the recurrence over
padding or scores padded positions does more work than this, which the ratio to the machine peak then shows.
`tests/test_speed_flops.py` checks the count against `torch.utils.flop_counter.FlopCounterMode` on one batch.
"""

from __future__ import annotations

from dataclasses import dataclass

from pflm.errors import ConfigError
from pflm.model.options import ModelConfig


@dataclass(frozen=True)
class LayerFlops:
    name: str
    forward: int  # per token
    backward: int  # per token (weight gradient + input gradient where needed)

    @property
    def total(self) -> int:
        return self.forward + self.backward


def _matmul(name: str, n_in: int, n_out: int, input_grad: bool) -> LayerFlops:
    f = 2 * n_in * n_out
    return LayerFlops(name, f, f * (2 if input_grad else 1))


def lstm_layer_flops(cfg: ModelConfig, vocab_size: int, train_embeddings: bool = True) -> list[LayerFlops]:
    """Per-token training FLOPs of each weight matrix of an LSTM LM with a full softmax over `vocab_size` rows
    (every weight trains; LoRA is not modelled). Raises ConfigError for other architectures."""
    if cfg.arch != "lstm":
        raise ConfigError(f"analytic FLOPs are implemented for model.arch=lstm only, got {cfg.arch!r}")
    e, h = cfg.embedding_dim, cfg.hidden_dim
    layers: list[LayerFlops] = []
    for k in range(cfg.num_layers):
        n_in = e if k == 0 else h
        layers.append(_matmul(f"rnn.weight_ih_l{k}", n_in, 4 * h, input_grad=k > 0 or train_embeddings))
        layers.append(_matmul(f"rnn.weight_hh_l{k}", h, 4 * h, input_grad=True))
    if cfg.has_proj:
        layers.append(_matmul("proj.weight", h, e, input_grad=True))
    layers.append(_matmul("output.weight", cfg.output_dim, vocab_size, input_grad=True))
    return layers


def training_flops_per_token(cfg: ModelConfig, vocab_size: int, train_embeddings: bool = True) -> int:
    """Sum of `lstm_layer_flops`: matrix-product FLOPs of one trained token (forward + backward)."""
    return sum(x.total for x in lstm_layer_flops(cfg, vocab_size, train_embeddings))


__all__ = ["LayerFlops", "lstm_layer_flops", "training_flops_per_token"]
