"""LoRA adapters for pflm LMs: devices train and send only low-rank deltas; the server can merge them.

Every adapted weight W [out, in] gets W_eff = W + (alpha / rank) * B @ A with A [rank, in] (Kaiming-uniform
init, as in the LoRA paper) and B [out, rank] (zeros), so a fresh adapter leaves the model unchanged.

Trainable-parameter formula (what `count_lora_parameters` returns and `expected_lora_parameter_count`
computes from the config alone): r * sum over adapted matrices of (in + out), i.e. with E = embedding_dim,
H = hidden_dim, F = ff_dim, L = num_layers, r = rank:
  "rnn"  (LSTM):        r * [(E + 4H) + (H + 4H)] + (L - 1) * r * [(H + 4H) + (H + 4H)]
  "attn" (transformer): L * 4 * r * (H + H)                       (q, k, v, o)
  "ffn"  (transformer): L * 2 * r * (H + F)                       (fc1, fc2)
  "proj":               r * (H + E) for `proj` (tied, H != E) + r * (E + H) for `in_proj` (transformer, H != E)
Targets that do not exist in the architecture are skipped. Adapter names: `<module>.lora_A.weight` and
`<module>.lora_B.weight` (for the LSTM: `rnn.l{k}.ih.*` / `rnn.l{k}.hh.*`, identical for nn.LSTM and DPLSTM).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from pflm.errors import ConfigError
from pflm.model.options import LoraConfig, ModelConfig
from pflm.model.factory import LanguageModel


def _lora_pair(in_features: int, out_features: int, rank: int,
               linear_cls: type[nn.Linear]) -> tuple[nn.Linear, nn.Linear]:
    a = linear_cls(in_features, rank, bias=False)
    b = linear_cls(rank, out_features, bias=False)
    nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
    nn.init.zeros_(b.weight)
    return a, b


class LoRALinear(nn.Module):
    """A Linear with frozen base `weight`/`bias` (the wrapped Linear's own Parameters, same names) plus
    adapters `lora_A`, `lora_B` (plain nn.Linear / Opacus RNNLinear, so Opacus computes their per-sample grads).

    y = x W^T + b + scale * (x A^T) B^T
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.scale = alpha / rank
        linear_cls = type(base) if type(base) is not nn.Linear else nn.Linear
        self.lora_A, self.lora_B = _lora_pair(base.in_features, base.out_features, rank, linear_cls)
        self.lora_A.to(base.weight), self.lora_B.to(base.weight)
        object.__setattr__(self, "_base_module", base)  # restored by merge_lora; not a registered submodule

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * self.lora_B(self.lora_A(x))

    def merged(self) -> nn.Linear:
        """Fold the adapter into the base Linear (in place) and return that Linear."""
        base: nn.Linear = self._base_module  # type: ignore[assignment]
        with torch.no_grad():
            base.weight.add_(self.delta_weight())
        return base


class LoRAFactors(nn.Module):
    """Adapter for a weight used inside a fused kernel (nn.LSTM): only lora_A / lora_B, no forward."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, like: torch.Tensor) -> None:
        super().__init__()
        self.scale = alpha / rank
        self.lora_A, self.lora_B = _lora_pair(in_features, out_features, rank, nn.Linear)
        self.lora_A.to(like), self.lora_B.to(like)

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B.weight @ self.lora_A.weight)


def _named_linear_targets(model: LanguageModel, targets: Iterable[str]) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute name) of every nn.Linear that the target families select."""
    found: list[tuple[nn.Module, str]] = []
    targets = set(targets)
    if "proj" in targets:
        for attr in ("in_proj", "proj"):
            if isinstance(getattr(model, attr, None), nn.Linear):
                found.append((model, attr))
    for layer in getattr(model, "layers", []):
        if "attn" in targets:
            found += [(layer.attn, n) for n in ("q", "k", "v", "o")]
        if "ffn" in targets:
            found += [(layer.ffn, n) for n in ("fc1", "fc2")]
    if "rnn" in targets and model.cfg.arch == "lstm" and not isinstance(model.rnn, nn.LSTM):  # DPLSTM cells
        for k in range(model.cfg.num_layers):
            cell = getattr(model.rnn, f"l{k}")
            found += [(cell, "ih"), (cell, "hh")]
    return found


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, (LoRALinear, LoRAFactors)) for m in model.modules())


def apply_lora(model: LanguageModel, lora: LoraConfig) -> LanguageModel:
    """Add adapters in place and freeze every non-adapter parameter (use `set_trainable` to unfreeze e.g. the
    embedding rows a device updates). Returns the model. rank must be > 0; LoRA cannot be applied twice."""
    if not lora.enabled:
        raise ConfigError("apply_lora needs model.lora.rank > 0; set e.g. model.lora.rank=8")
    if has_lora(model):
        raise ConfigError("model already has LoRA adapters; merge_lora(model) first or build a fresh model")
    for p in model.parameters():
        p.requires_grad_(False)
    count = 0
    for parent, attr in _named_linear_targets(model, lora.targets):
        setattr(parent, attr, LoRALinear(getattr(parent, attr), lora.rank, lora.alpha))
        count += 1
    if "rnn" in lora.targets and model.cfg.arch == "lstm" and isinstance(model.rnn, nn.LSTM):
        rnn = model.rnn
        for k in range(model.cfg.num_layers):
            container = nn.Module()
            for kind in ("ih", "hh"):
                w = getattr(rnn, f"weight_{kind}_l{k}")
                container.add_module(kind, LoRAFactors(w.shape[1], w.shape[0], lora.rank, lora.alpha, w))
                count += 1
            rnn.add_module(f"l{k}", container)
    if count == 0:
        raise ConfigError(f"model.lora.targets={lora.targets} match no layer of a {model.cfg.arch} model; "
                          f"use 'rnn'/'proj' for lstm, 'attn'/'ffn'/'proj' for transformer")
    model.lora_config = lora  # type: ignore[assignment]
    return model


def merge_lora(model: LanguageModel) -> LanguageModel:
    """Fold every adapter into its base weight and remove it (in place). Trainability flags of base parameters
    are left as they are. Logits are unchanged up to float rounding."""
    for parent in list(model.modules()):
        for attr, child in list(parent._modules.items()):
            if isinstance(child, LoRALinear):
                setattr(parent, attr, child.merged())
    if model.cfg.arch == "lstm" and isinstance(model.rnn, nn.LSTM):
        adapters = model.fused_lora_adapters()  # type: ignore[operator]
        with torch.no_grad():
            for name, adapter in adapters.items():
                getattr(model.rnn, name).add_(adapter.delta_weight())
        for k in range(model.cfg.num_layers):
            model.rnn._modules.pop(f"l{k}", None)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def lora_parameter_names(model: nn.Module) -> list[str]:
    """Names (as in named_parameters / state_dict) of all adapter parameters."""
    return [n for n, _ in model.named_parameters() if ".lora_A." in f".{n}" or ".lora_B." in f".{n}"]


def count_lora_parameters(model: nn.Module) -> int:
    names = set(lora_parameter_names(model))
    return sum(p.numel() for n, p in model.named_parameters() if n in names)


def expected_lora_parameter_count(cfg: ModelConfig, lora: LoraConfig | None = None) -> int:
    """The module docstring's formula, from the config alone."""
    lora = lora or cfg.lora
    r, e, h, f, n = lora.rank, cfg.embedding_dim, cfg.hidden_dim, cfg.ff_dim, cfg.num_layers
    total = 0
    if cfg.arch == "lstm" and "rnn" in lora.targets:
        total += r * ((e + 4 * h) + (h + 4 * h)) + (n - 1) * r * (2 * (h + 4 * h))
    if cfg.arch == "transformer":
        if "attn" in lora.targets:
            total += n * 4 * r * (h + h)
        if "ffn" in lora.targets:
            total += n * 2 * r * (h + f)
    if "proj" in lora.targets:
        total += r * (h + e) * (int(cfg.has_proj) + int(cfg.has_in_proj))
    return total


NamesOrPredicate = Iterable[str] | Callable[[str], bool]


def set_trainable(model: nn.Module, names_or_predicate: NamesOrPredicate, trainable: bool = True,
                  exclusive: bool = False) -> list[str]:
    """Set requires_grad=trainable on the parameters selected by a list of names (exact names, or prefixes
    ending in '.') or a predicate on the name. With exclusive=True every other parameter gets the opposite
    flag. Returns the selected names; unknown exact names raise ConfigError."""
    params = dict(model.named_parameters())
    if callable(names_or_predicate):
        selected = [n for n in params if names_or_predicate(n)]
    else:
        wanted = list(names_or_predicate)
        selected = []
        for w in wanted:
            hits = [n for n in params if n.startswith(w)] if w.endswith(".") else ([w] if w in params else [])
            if not hits:
                raise ConfigError(f"set_trainable: no parameter named {w!r}; see model.named_parameters()")
            selected += [h for h in hits if h not in selected]
    chosen = set(selected)
    for n, p in params.items():
        if n in chosen:
            p.requires_grad_(trainable)
        elif exclusive:
            p.requires_grad_(not trainable)
    return selected


def trainable_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (what a LoRA device uploads), detached."""
    sd = model.state_dict()
    return {n: sd[n].detach() for n in lora_parameter_names(model)}
