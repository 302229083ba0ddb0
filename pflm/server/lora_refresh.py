"""Server-side LoRA merging: fold the global adapters into the base weights and restart them.

Federated LoRA from scratch is capped at rank r; periodically folding the learnt low-rank delta into the
(frozen-on-device) base weights and restarting the adapters (B = 0, fresh seeded A) lets the global model
accumulate full-rank change over rounds while devices still train and send only r·(in+out) values per matrix.
The restart is seeded by (run seed, round), so resumed runs refresh identically.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pflm.model.lora import LoRAFactors, LoRALinear


@torch.no_grad()
def fold_and_restart(model: nn.Module, seed: int, round_idx: int) -> int:
    """W += scale·B·A for every adapter, then B ← 0 and A ← Kaiming-uniform(seed, round). Returns #adapters."""
    gen = torch.Generator().manual_seed(hash((seed, round_idx, 0x10A)) & (2**62 - 1))
    fused = model.fused_lora_adapters() if hasattr(model, "fused_lora_adapters") else {}
    base_of = {id(ad): getattr(model.rnn, name) for name, ad in fused.items()}
    n = 0
    for module in model.modules():
        if isinstance(module, LoRALinear):
            base = module.weight
        elif isinstance(module, LoRAFactors):
            base = base_of[id(module)]
        else:
            continue
        base.add_(module.delta_weight().to(base.dtype))
        a = module.lora_A.weight
        bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=√5) on a [r, in] matrix
        a.copy_(torch.rand(a.shape, generator=gen, dtype=a.dtype) * 2 * bound - bound)
        module.lora_B.weight.zero_()
        n += 1
    return n
