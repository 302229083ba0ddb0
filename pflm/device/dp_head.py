"""The LM output layer as one Opacus-visible module (`DPOutputHead`) with its own grad and norm samplers.

Device DP-SGD's sampled-softmax / NCE losses gather output rows functionally (``weight[ids]``), which Opacus'
module hooks cannot see; every use of the output weight/bias on Opacus' paths therefore goes through this module,
which holds the model's own Parameters (used by `pflm.device.dpsgd._DPNet`)."""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from torch import nn
from torch.nn import functional as F


class DPOutputHead(nn.Module):
    """The LM output layer as one Opacus-visible module, sharing the model's output weight [V, H] and bias [V].

    ``head(h)`` -> full logits [B, T, V]; ``head(h, cand)`` with candidate row ids cand [B, C] -> scores
    [B, T, C] = h · weight[cand] + bias[cand] (each sentence scores its own candidate rows)."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias

    def forward(self, h: torch.Tensor, cand: torch.Tensor | None = None) -> torch.Tensor:
        if cand is None:
            return F.linear(h, self.weight, self.bias)
        s = torch.bmm(h, self.weight[cand].transpose(1, 2))
        if self.bias is not None:
            s = s + self.bias[cand].unsqueeze(1)
        return s


def _head_per_row(head: DPOutputHead, activations: list[torch.Tensor], backprops: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample gradients of the gathered candidates: weight part [B, C, H], bias part [B, C]."""
    h = activations[0].to(backprops.dtype)
    return torch.einsum("btc,bth->bch", backprops, h), backprops.sum(1)


@register_grad_sampler(DPOutputHead)
def _head_grad_sample(head: DPOutputHead, activations: list[torch.Tensor], backprops: torch.Tensor
                      ) -> dict[nn.Parameter, torch.Tensor]:
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if len(activations) == 1:  # full logits: exactly nn.Linear's per-sample gradient
        h = activations[0].to(backprops.dtype)
        if head.weight.requires_grad:
            ret[head.weight] = torch.einsum("n...i,n...j->nij", backprops, h)
        if head.bias is not None and head.bias.requires_grad:
            ret[head.bias] = torch.einsum("n...k->nk", backprops)
        return ret
    cand = activations[1]
    gw, gb = _head_per_row(head, activations, backprops)
    b, v = cand.shape[0], head.weight.shape[0]
    if head.weight.requires_grad:
        idx = cand.unsqueeze(-1).expand(-1, -1, gw.shape[-1])
        ret[head.weight] = gw.new_zeros(b, v, gw.shape[-1]).scatter_add_(1, idx, gw)
    if head.bias is not None and head.bias.requires_grad:
        ret[head.bias] = gb.new_zeros(b, v).scatter_add_(1, cand, gb)
    return ret


@register_norm_sampler(DPOutputHead)
def _head_norm_sample(head: DPOutputHead, activations: list[torch.Tensor], backprops: torch.Tensor
                      ) -> dict[nn.Parameter, torch.Tensor]:
    """Ghost clipping: per-sample gradient norms without the dense [B, V, H] tensor."""
    ret: dict[nn.Parameter, torch.Tensor] = {}
    if len(activations) == 1:  # full logits: Gram-matrix trick, ||sum_t g_t h_t^T||^2 = <G G^T, H H^T>
        h = activations[0].to(backprops.dtype)
        ggt = torch.einsum("btk,bsk->bts", backprops, backprops)
        if head.weight.requires_grad:
            aat = torch.einsum("btk,bsk->bts", h, h)
            ret[head.weight] = torch.einsum("bts,bts->b", ggt, aat).clamp(min=0).sqrt()
        if head.bias is not None and head.bias.requires_grad:
            ret[head.bias] = ggt.sum((1, 2)).clamp(min=0).sqrt()
        return ret
    cand = activations[1]
    gw, gb = _head_per_row(head, activations, backprops)
    # Candidate ids repeat (shared noise words, repeated targets): merge them per sample before the norm, over
    # the union U of rows this batch touched ([B, |U|, H], |U| <= k + B*T), not all V rows.
    uniq, inv = torch.unique(cand, return_inverse=True)
    if head.weight.requires_grad:
        dense = gw.new_zeros(cand.shape[0], uniq.numel(), gw.shape[-1])
        dense.scatter_add_(1, inv.unsqueeze(-1).expand(-1, -1, gw.shape[-1]), gw)
        ret[head.weight] = dense.flatten(1).norm(dim=1)
    if head.bias is not None and head.bias.requires_grad:
        ret[head.bias] = gb.new_zeros(cand.shape[0], uniq.numel()).scatter_add_(1, inv, gb).norm(dim=1)
    return ret


__all__ = ["DPOutputHead"]
