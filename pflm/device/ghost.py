"""Ghost clipping's two backward passes (Opacus' `DPTensorFastGradientClipping.backward`), without the wasted
weight gradients of the first pass.

Opacus' first pass is a full `loss.backward()` that only serves to fire the per-sample norm hooks; every weight
gradient it computes is thrown away by the `zero_grad()` that follows. For an LM the biggest of those is the
output layer's [V, H] gradient (one [B·T, V] x [B·T, H] product per step, ~1/5 of a ghost step's matrix work at
V = 10k). Here the first pass is `torch.autograd.grad` with respect to the trainable parameters *other than*
the `skip` ones (the output layer): autograd prunes the skipped weight products, while the gradient still flows
through the output layer to the earlier ones, so every module's backward hook (the output layer's included)
fires and records its norm exactly as before. Clip factors, the second pass and everything after it are Opacus'.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from opacus.grad_sample import GradSampleModuleFastGradientClipping
from opacus.optimizers import DPOptimizerFastGradientClipping


def ghost_clipped_backward(gsm: GradSampleModuleFastGradientClipping, optimizer: DPOptimizerFastGradientClipping,
                           loss_per_sample: torch.Tensor, skip: Iterable[torch.Tensor] = ()) -> None:
    """Same effect as ``DPTensorFastGradientClipping(gsm, optimizer, loss_per_sample, "mean").backward()``:
    per-sample norms in ``p._norm_sample``, then ``p.grad`` = gradient of sum_b coef_b * loss_b."""
    skip_ids = {id(p) for p in skip}
    params = [p for p in optimizer.params if p.requires_grad]
    first = [p for p in params if id(p) not in skip_ids]
    reduced = torch.mean(loss_per_sample, dim=0)
    if first:
        torch.autograd.grad(reduced, first, retain_graph=True, allow_unused=True)
    else:  # nothing upstream of the skipped parameters: the plain first pass
        reduced.backward(retain_graph=True)
    optimizer.zero_grad()
    coeff = gsm.get_clipping_coef()
    second = torch.sum(coeff.to(loss_per_sample.device) * loss_per_sample)
    gsm.disable_hooks()
    try:
        second.backward()
    finally:
        gsm.enable_hooks()


__all__ = ["ghost_clipped_backward"]
