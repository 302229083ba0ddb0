"""LSTM language model: fused `nn.LSTM` for speed, or Opacus' `DPLSTM` (same parameter names) for DP-SGD."""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from pflm.model.options import ModelConfig
from pflm.model.factory import LanguageModel

INIT_RANGE = 0.1


class LSTMLanguageModel(LanguageModel):
    """embedding [V,E] -> LSTM(E -> H, num_layers, batch_first) -> (proj H->E if tied) -> output.

    The recurrent module is `rnn`. Its parameters are named like nn.LSTM's (`rnn.weight_ih_l0`,
    `rnn.weight_hh_l0`, `rnn.bias_ih_l0`, `rnn.bias_hh_l0`, ...) in both variants, so state dicts
    copy between the fused and the DPLSTM model without any renaming.

    LoRA (pflm.model.lora) uses the same names in both variants: adapters live at `rnn.l{k}.ih` /
    `rnn.l{k}.hh` (`lora_A.weight`, `lora_B.weight`). On DPLSTM those are the cell's own input/recurrent
    Linears, wrapped; on the fused nn.LSTM they are small containers added to the nn.LSTM module, and the
    forward pass runs the fused kernel with W + scale * B @ A via functional_call (base names unchanged).
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, dp_compatible: bool = False,
                 fused_dp_lstm: bool = False) -> None:
        super().__init__(cfg, vocab_size, dp_compatible)
        rnn_dropout = cfg.dropout if cfg.num_layers > 1 else 0.0
        self.rnn: nn.Module
        if dp_compatible:
            from opacus.layers import DPLSTM
            self.rnn = DPLSTM(cfg.embedding_dim, cfg.hidden_dim, num_layers=cfg.num_layers,
                              batch_first=True, dropout=rnn_dropout)
            if fused_dp_lstm:  # same DPLSTM parameters, run fused (pflm.model.fused_dplstm)
                from pflm.model.fused_dplstm import make_fused
                make_fused(self.rnn)
        else:
            self.rnn = nn.LSTM(cfg.embedding_dim, cfg.hidden_dim, num_layers=cfg.num_layers,
                               batch_first=True, dropout=rnn_dropout)
        if dp_compatible:
            # Opacus' DPLSTM registers each weight twice (`weight_ih_l0` and `l0.ih.weight`) and only hides the
            # alias when it is the root module; hide it here too so state dicts match nn.LSTM's exactly.
            self._register_state_dict_hook(_drop_dplstm_aliases)
            self.register_load_state_dict_post_hook(_ignore_missing_dplstm_aliases)
        self.reset_parameters()

    def _dplstm_alias_keys(self, prefix: str) -> set[str]:
        old_to_new: dict[str, str] = getattr(self.rnn, "old_to_new", {})
        return {f"{prefix}rnn.{old}" for old in old_to_new}

    def reset_parameters(self) -> None:
        """Uniform(-0.1, 0.1) embeddings and output weights (classic LSTM-LM init), zero output bias,
        PyTorch's default uniform(+-1/sqrt(H)) init for the LSTM."""
        nn.init.uniform_(self.embedding.weight, -INIT_RANGE, INIT_RANGE)
        if self.output is not None:
            nn.init.uniform_(self.output.weight, -INIT_RANGE, INIT_RANGE)
            nn.init.zeros_(self.output.bias)
        else:
            nn.init.zeros_(self._parameters["output_bias"])  # type: ignore[arg-type]
        k = 1.0 / self.cfg.hidden_dim ** 0.5
        for name, p in self.rnn.named_parameters():
            if name.startswith(("weight_", "bias_")):
                nn.init.uniform_(p, -k, k)

    def recurrent_weight_names(self) -> list[str]:
        """nn.LSTM-style names of the recurrent weight matrices (LoRA "rnn" targets)."""
        return [f"weight_{kind}_l{k}" for k in range(self.cfg.num_layers) for kind in ("ih", "hh")]

    def fused_lora_adapters(self) -> dict[str, nn.Module]:
        """Adapters on the fused nn.LSTM, keyed by the weight they adapt (e.g. "weight_hh_l0")."""
        if not isinstance(self.rnn, nn.LSTM):
            return {}
        found = {}
        for k in range(self.cfg.num_layers):
            container = self.rnn._modules.get(f"l{k}")
            if container is None:
                continue
            for kind in ("ih", "hh"):
                adapter = container._modules.get(kind)
                if adapter is not None and hasattr(adapter, "delta_weight"):
                    found[f"weight_{kind}_l{k}"] = adapter
        return found

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self.rnn, "pflm_fused", False):
            from pflm.model.fused_dplstm import fused_dplstm_forward
            return fused_dplstm_forward(self.rnn, x)  # type: ignore[arg-type]
        adapters = self.fused_lora_adapters()
        if adapters:
            weights = {name: getattr(self.rnn, name) + adapter.delta_weight()  # type: ignore[operator]
                       for name, adapter in adapters.items()}
            out, _ = functional_call(self.rnn, weights, (x,))
            return out
        out, _ = self.rnn(x)
        return out


def _drop_dplstm_aliases(module: LSTMLanguageModel, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in module._dplstm_alias_keys(prefix):
        state_dict.pop(key, None)
    # Reorder the recurrent weights into nn.LSTM's order (per layer: weight_ih, weight_hh, bias_ih, bias_hh).
    items = list(state_dict.items())
    slots = [i for i, (k, _) in enumerate(items) if k.startswith(f"{prefix}rnn.") and k.count(".") == prefix.count(".") + 1]
    rank = {f"{prefix}rnn.{kind}_{w}_l{layer}": (layer, j * 2 + m)
            for layer in range(module.cfg.num_layers)
            for j, kind in enumerate(("weight", "bias")) for m, w in enumerate(("ih", "hh"))}
    ordered = sorted((items[i] for i in slots), key=lambda kv: rank.get(kv[0], (10**9, 0)))
    for i, kv in zip(slots, ordered):
        items[i] = kv
    state_dict.clear()
    state_dict.update(items)


def _ignore_missing_dplstm_aliases(module: LSTMLanguageModel, incompatible_keys: object) -> None:
    aliases = module._dplstm_alias_keys("")
    missing: list[str] = incompatible_keys.missing_keys  # type: ignore[attr-defined]
    missing[:] = [k for k in missing if not any(k == a or k.endswith("." + a) for a in aliases)]
