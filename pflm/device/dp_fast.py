"""Fast ghost clipping for device DP-SGD: the output layer at valid positions only, its clipped sum book-kept.

Same mechanism as Opacus' ghost clipping in `pflm.device.dpsgd` (per-sentence gradient norms, clip factors
c_i = min(1, C / (||g_i|| + 1e-6)), p.grad = sum_i c_i g_i, then the same optimizer: keyed noise, division by
the expected batch size), computed with less work on the LM's largest layer:

* Packed head. The scores are computed only at the N valid positions (rows h[mask], [N, H]), not on the padded
  [B, T, V] block that Opacus' Linear hooks need. For sampled softmax / NCE only over the union U of this batch's
  candidate rows (noise words and targets), S = h W[U]^T + b[U]; each position reads its noise and target
  scores from S, so a row used twice by one sentence is merged (autograd's gather backward) before any norm.
* The head's per-sentence norms from its own Gram blocks: with M = dL/dS [N, C] (rows of sentence i: M_i,
  H_i), ||M_i^T H_i||^2 = <M_i M_i^T, H_i H_i^T> and the bias ||sum_t M_i,t||^2, from valid rows only
  (padded positions never enter, whatever they hold).
* Book-keeping (Bu et al. 2023, arXiv 2210.00038): no second backward. The head's clipped sum is ONE product
  M^T (c ⊙ H) [C, H]. The rest of the network (LSTM, embedding, LoRA adapters: Opacus-hooked modules, as
  before) gets dh = M W[U] in one backward that fires Opacus' ghost norm hooks (autograd is asked for one
  parameter per module, its bias where trainable, so no weight product is wasted); `BodyRecorder` keeps each
  module's activations A and backprops G from it, and the clipped sums are (c ⊙ G)^T A (Linear, incl. the fused
  DP-LSTM's whole-sequence Linears) and a row index_add of c ⊙ G (Embedding). A body with any other module type
  (e.g. a Transformer's LayerNorm) takes a second, c-scaled backward through the body only (`bookkept` False).

Randomness and accounting are untouched: the Poisson batches, the NCE noise words (same generator draws) and the
keyed Gaussian noise are drawn exactly as on the Opacus path, by the same callers. Not used (the caller falls back
to Opacus' two-pass ghost clipping) when the output weight is shared with the embedding (tied) or the model has
no plain output Linear.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pflm.model.losses import token_losses


class BodyRecorder:
    """Keeps what Opacus' ghost norm hooks see in pass 1, (module, activations, backprops), for book-keeping.

    Installed once per wrapped model: the ghost module's norm samplers are looked up on the instance
    (``self.NORM_SAMPLERS[type(module)]``), so an instance copy of that table with recording wrappers shadows the
    class one for this model only; each wrapper records, then returns Opacus' own norms unchanged."""

    def __init__(self, hooks) -> None:
        self.records: list[tuple[nn.Module, list[torch.Tensor], torch.Tensor]] | None = None
        self.bookkept = False  # whether the last step's body sum came from the records (else a second backward)
        table = dict(type(hooks).NORM_SAMPLERS)
        hooks.NORM_SAMPLERS = {t: self._wrap(fn) for t, fn in table.items()}

    def _wrap(self, fn):
        def sampler(module, activations, backprops):
            if self.records is not None:
                self.records.append((module, activations, backprops))
            return fn(module, activations, backprops)
        return sampler


def _accumulate(grads: dict[int, torch.Tensor], p: torch.Tensor, g: torch.Tensor) -> None:
    """A module called several times in one forward (e.g. a per-time-step Linear) leaves one record per call:
    its gradient is the sum over the calls, never the last call's alone."""
    grads[id(p)] = g if id(p) not in grads else grads[id(p)] + g


def _bookkept_body(records, body: Sequence[torch.Tensor], coef: torch.Tensor) -> list[torch.Tensor] | None:
    """sum_i c_i g_i of every body parameter from pass 1's activations and backprops (Linear: (c ⊙ G)^T A;
    Embedding: rows index_add of c ⊙ G), or None if some module is of another type or a parameter is missed
    (the caller then runs the second backward instead)."""
    grads: dict[int, torch.Tensor] = {}
    for module, acts, bp in records:
        gc = bp * coef.view(-1, *([1] * (bp.dim() - 1))).to(bp.dtype)
        if isinstance(module, nn.Embedding) and not module.sparse and module.max_norm is None:
            if module.weight.requires_grad:
                g = torch.zeros_like(module.weight).index_add_(0, acts[0].reshape(-1), gc.reshape(-1, gc.shape[-1]))
                if module.padding_idx is not None:
                    g[module.padding_idx] = 0
                _accumulate(grads, module.weight, g)
        elif isinstance(module, nn.Linear):
            g2 = gc.reshape(-1, gc.shape[-1])
            if module.weight.requires_grad:
                _accumulate(grads, module.weight, g2.t() @ acts[0].reshape(-1, acts[0].shape[-1]).to(g2.dtype))
            if module.bias is not None and module.bias.requires_grad:
                _accumulate(grads, module.bias, g2.sum(0))
        else:
            return None
    if set(grads) != {id(p) for p in body}:
        return None
    return [grads[id(p)] for p in body]


def _pass1_targets(lm: nn.Module, body: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """One trainable parameter per module owning body parameters (its bias if trainable): asking autograd for
    these reaches every hooked module (so every norm hook fires) without computing the weight products the
    book-keeping recomputes with the clip factors (autograd skips the gradient of an unrequested weight)."""
    want = {id(p) for p in body}
    out: list[torch.Tensor] = []
    for module in lm.modules():
        inner = {id(p) for child in module.children() for p in child.parameters()}  # DPLSTM aliases its cells'
        own = [p for p in module.parameters(recurse=False) if id(p) in want and id(p) not in inner]
        if own:
            bias = getattr(module, "bias", None)
            out.append(bias if any(bias is p for p in own) else own[0])
    return out


def fast_ghost_supported(lm: torch.nn.Module) -> bool:
    """Whether `packed_clipped_step` applies: an untied output Linear (weight [V, H] used by the head only)."""
    return getattr(lm, "output", None) is not None and lm.output_weight() is not lm.embedding.weight


def _head_scores(hv: torch.Tensor, tv: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 kind: str, noise: torch.Tensor, sampler, log_z: float
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(per-token losses [N], scores leaf S [N, C], rows [C] of the output layer that S covers (None = all),
    the weight rows W[rows] [C, H])."""
    if kind == "full":
        with torch.no_grad():
            s = F.linear(hv, weight, bias)
        s.requires_grad_(True)
        return token_losses("full", tv, s), s, None, weight
    k = noise.numel()
    rows, inv = torch.unique(torch.cat([noise, tv]), return_inverse=True)
    w_used = weight[rows]
    with torch.no_grad():
        s = F.linear(hv, w_used, None if bias is None else bias[rows])
    s.requires_grad_(True)
    s_n = s[:, inv[:k]]  # [N, k]: every position scores the shared noise words
    s_t = s.gather(1, inv[k:].unsqueeze(1)).squeeze(1)  # [N]: each position its own target
    return token_losses(kind, tv, (s_t, s_n), noise, sampler, log_z=log_z), s, rows, w_used


def _gram_norm_sq(m: torch.Tensor, hv: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """||M_i^T H_i||_F^2 per sentence via <M_i M_i^T, H_i H_i^T>; the packed rows of sentence i are contiguous
    (row-major `mask.nonzero()` order), so each block is a slice: no padded [B, T, C] copy."""
    out = m.new_zeros(len(counts))
    start = 0
    for i, n in enumerate(counts):
        if n:
            mi, hi = m[start : start + n], hv[start : start + n]
            out[i] = ((mi @ mi.t()) * (hi @ hi.t())).sum()
        start += n
    return out


def packed_clipped_step(lm: torch.nn.Module, params: Sequence[torch.nn.Parameter], hooks, max_grad_norm: float,
                        inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor,
                        kind: str, sampler=None, log_z: float = 0.0, recorder: BodyRecorder | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Set p.grad = sum_i c_i g_i for every p in `params` (c_i = min(1, C / (||g_i|| + 1e-6)), g_i the gradient
    of sentence i's mean token loss); returns (per-sentence losses [B], per-sentence norms [B]).

    `hooks`: the Opacus ghost-clipping module wrapping `lm` (its norm hooks give the body's per-sentence norms;
    they are switched off for the second body pass). With a `recorder` on `hooks`, the body's clipped sum is
    book-kept from pass 1 (no second body backward) where every body module is a Linear or an Embedding."""
    mask = mask.bool()
    bsz = mask.shape[0]
    weight, bias = lm.output_weight(), lm.output_bias()
    head_ids = {id(weight), id(bias)}
    body = [p for p in params if id(p) not in head_ids]
    for p in body:  # a norm left from an earlier step must never be reused
        p.__dict__.pop("_norm_sample", None)
    h = lm.features(inputs)  # [B, T, H]; Opacus records the body's activations
    seq = mask.nonzero(as_tuple=True)[0]  # sentence of each valid position
    counts = mask.sum(1)
    hv = h.detach()[mask]  # [N, H]
    tok, s, rows, w_used = _head_scores(hv, targets[mask], weight.detach(), None if bias is None else bias.detach(),
                                kind, noise, sampler, log_z)
    per_seq = torch.zeros(bsz, dtype=tok.dtype, device=tok.device).index_add(0, seq, tok)
    per_seq = per_seq / counts.clamp(min=1).to(tok.dtype)
    (m,) = torch.autograd.grad(per_seq.sum(), s)  # [N, C]: row n only depends on its own sentence's loss
    sq = m.new_zeros(bsz)
    if weight.requires_grad:
        sq = sq + _gram_norm_sq(m, hv, counts.tolist())
    if bias is not None and bias.requires_grad:
        sq = sq + m.new_zeros(bsz, m.shape[1]).index_add_(0, seq, m).pow(2).sum(1)
    dh = None
    if body:
        dh = h.new_zeros(h.shape)
        dh[mask] = m @ w_used
        # pass 1: Opacus' norm hooks see sum-loss backprops (they rescale "mean" backprops by the batch size)
        if recorder is not None:
            recorder.records = []
        try:
            targets_1 = _pass1_targets(lm, body) if recorder is not None else list(body)
            torch.autograd.grad(h, targets_1, grad_outputs=dh / bsz, retain_graph=True, allow_unused=True)
        finally:
            records = recorder.records if recorder is not None else None
            if recorder is not None:
                recorder.records = None
        try:
            sq = sq + torch.stack([p._norm_sample for p in body]).pow(2).sum(0)  # type: ignore[attr-defined]
        except AttributeError as e:
            raise RuntimeError("fast ghost clipping found a trainable parameter without a per-sample norm (used "
                               "outside an Opacus-visible module); set dpsgd.fast_ghost=false or "
                               "grad_sample_mode=hooks") from e
    norms = sq.clamp(min=0).sqrt()
    coef = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    cs = coef[seq].to(m.dtype)  # [N]: each valid position's sentence factor
    if weight.requires_grad:
        gw = m.t() @ (hv * cs.unsqueeze(1))  # [C, H]: the head's clipped sum (c ⊙ M)^T H in one product
        weight.grad = gw if rows is None else torch.zeros_like(weight).index_add_(0, rows, gw)
    if bias is not None and bias.requires_grad:
        gb = m.t() @ cs
        bias.grad = gb if rows is None else torch.zeros_like(bias).index_add_(0, rows, gb)
    if body:
        assert dh is not None
        grads = None if records is None else _bookkept_body(records, body, coef)
        if recorder is not None:
            recorder.bookkept = grads is not None
        if grads is None:
            hooks.disable_hooks()
            try:  # pass 2: sum_i c_i dh_i through the body
                grads = torch.autograd.grad(h, body, grad_outputs=dh * coef.view(-1, 1, 1), allow_unused=True)
            finally:
                hooks.enable_hooks()
        for p, g in zip(body, grads):
            p.grad = torch.zeros_like(p) if g is None else g
    return per_seq.detach(), norms


__all__ = ["fast_ghost_supported", "packed_clipped_step"]
