"""Fast DP-SGD for LSTMs: Opacus' `DPLSTM` parameters, run as one fused LSTM plus two whole-sequence Linears.

Opacus' `DPLSTM` runs its cell step by step in Python and its `RNNLinear` hooks build a per-sample gradient
[B, 4H, in] at *every* time step, which makes device DP-SGD 6-7x a non-private step. The gradient of an LSTM
weight is a sum over time of outer products of the gates' pre-activation gradients dG_t [B, 4H] with the
layer input x_t (for W_ih) or the previous hidden state h_{t-1} (for W_hh):

    dW_ih = sum_t dG_t x_t^T,   dW_hh = sum_t dG_t h_{t-1}^T,   db_ih = db_hh = sum_t dG_t

so per sentence it is exactly the gradient of a Linear applied to the whole sequence [B, T, in] whose output
gradient is dG [B, T, 4H]. `fused_dplstm_forward` makes that literal:

1. the fused kernel (`torch._VF.lstm`, what `nn.LSTM` runs) computes every h_t without autograd;
2. G = ih(x) + hh(h_prev) with h_prev = [0, h_1 .. h_{T-1}] *detached*: two Linear calls on whole sequences,
   which Opacus hooks like any Linear (one call each, so ghost clipping's Gram-matrix norm
   ||sum_t g_t a_t^T||^2 = sum_{t,s} (g_t.g_s)(a_t.a_s) applies, and hooks mode gets the same per-sample
   gradients from one einsum);
3. `_LSTMRecurrence` maps G to the hidden states (elementwise, the cell recurrence only) and its backward runs
   back-propagation through time itself (one [B,4H]x[4H,H] product per step), handing the *total* dG_t (direct
   plus through all later steps) to the two Linears. The path h_{t-1} -> G_t is therefore counted once, inside
   the recurrence, which is why h_prev enters the Linear detached.

The parameters stay Opacus' `DPLSTM` ones (same object type, names, cells `l{k}.ih` / `l{k}.hh`, so state dicts,
LoRA adapters and Opacus' DPLSTM special-casing are unchanged); only the cells' Linears become `SequenceLinear`
(called once per forward), with Opacus' own Linear grad and norm samplers registered for that type. Clipping,
noise and accounting remain Opacus'. Tested against Opacus' DPLSTM per-sample gradients in
tests/test_speed_dplstm.py. No hidden state is carried between calls (the LM always starts from zeros).
"""

from __future__ import annotations

import torch
from opacus.grad_sample import register_grad_sampler, register_norm_sampler
from opacus.grad_sample.linear import compute_linear_grad_sample, compute_linear_norm_sample
from opacus.layers import DPLSTM
from opacus.layers.dp_rnn import RNNLinear
from torch import nn
from torch.nn import functional as F


class SequenceLinear(RNNLinear):
    """A DPLSTM cell Linear applied once to a whole [B, T, in] sequence (Opacus' Linear samplers apply)."""


register_grad_sampler(SequenceLinear)(compute_linear_grad_sample)
register_norm_sampler(SequenceLinear)(compute_linear_norm_sample)


def make_fused(rnn: DPLSTM) -> DPLSTM:
    """Swap every cell's `ih` / `hh` RNNLinear for a SequenceLinear holding the same Parameters (in place).

    Afterwards the module must be run through `fused_dplstm_forward` (its own step-by-step forward would call
    each Linear T times, which ghost clipping refuses as parameter tying)."""
    if rnn.bidirectional or not rnn.batch_first:
        raise ValueError("fused DPLSTM supports unidirectional, batch_first LSTMs only")
    for k in range(rnn.num_layers):
        cell = getattr(rnn, f"l{k}")
        for kind in ("ih", "hh"):
            old = getattr(cell, kind)
            with torch.random.fork_rng(devices=[]):  # its random init is discarded: leave the global RNG as it was
                new = SequenceLinear(old.in_features, old.out_features, bias=old.bias is not None)
            new.weight = old.weight
            new.bias = old.bias
            setattr(cell, kind, new)
    rnn.pflm_fused = True  # type: ignore[attr-defined]
    return rnn


def is_fused(rnn: nn.Module) -> bool:
    return bool(getattr(rnn, "pflm_fused", False))


def _effective(linear: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) that `linear(x)` applies: the base weight plus a LoRA adapter's delta if any."""
    w = linear.weight
    delta = getattr(linear, "delta_weight", None)
    if delta is not None:
        w = w + delta()
    return w, linear.bias


class _LSTMRecurrence(torch.autograd.Function):
    """gates G [B, T, 4H] (pre-activations, PyTorch order i, f, g, o) -> hidden states h [B, T, H], zero start.

    backward: back-propagation through time with the recurrent weight `w_hh` [4H, H]; returns the total
    gradient of every G_t (no gradient for w_hh: that flows through the `hh` Linear that produced G)."""

    @staticmethod
    def forward(ctx, gates: torch.Tensor, w_hh: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        hid = w_hh.shape[1]
        i, f, g, o = gates.split(hid, dim=-1)
        i, f, o, g = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o), torch.tanh(g)
        ig = i * g
        c = torch.empty_like(ig)
        c[:, 0] = ig[:, 0]
        for t in range(1, gates.shape[1]):
            torch.addcmul(ig[:, t], f[:, t], c[:, t - 1], out=c[:, t])
        tc = torch.tanh(c)
        ctx.save_for_backward(i, f, g, o, c, tc, w_hh)
        return o * tc

    @staticmethod
    def backward(ctx, dh_out: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        i, f, g, o, c, tc, w_hh = ctx.saved_tensors
        b, steps, hid = i.shape
        c_prev = torch.cat([torch.zeros_like(c[:, :1]), c[:, :-1]], dim=1)
        # dG_t = [dc_t * g i(1-i), dc_t * c_{t-1} f(1-f), dc_t * i (1-g^2), dh_t * tanh(c_t) o(1-o)]
        p_c = torch.cat([g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g)], dim=-1)  # [B, T, 3H]
        p_h = tc * o * (1 - o)  # [B, T, H]
        dc_dh = o * (1 - tc * tc)  # dc_t += dh_t * o (1 - tanh^2 c_t)
        dgates = torch.empty(b, steps, 4 * hid, dtype=dh_out.dtype, device=dh_out.device)
        dh_out = dh_out.contiguous()
        dh = dh_out[:, -1]
        dc = dh * dc_dh[:, -1]
        for t in range(steps - 1, -1, -1):
            if t < steps - 1:
                dh = torch.addmm(dh_out[:, t], dgates[:, t + 1], w_hh)  # + dG_{t+1} W_hh
                dc = torch.addcmul(dc * f[:, t + 1], dh, dc_dh[:, t])
            torch.mul(p_c[:, t].view(b, 3, hid), dc.unsqueeze(1), out=dgates[:, t, : 3 * hid].view(b, 3, hid))
            torch.mul(p_h[:, t], dh, out=dgates[:, t, 3 * hid :])
        return dgates, None


def fused_dplstm_forward(rnn: DPLSTM, x: torch.Tensor) -> torch.Tensor:
    """Output sequence [B, T, H] of a `make_fused` DPLSTM on x [B, T, E] (zero initial state), with gradients
    (and Opacus per-sample gradients / ghost norms) equal to those of Opacus' step-by-step DPLSTM."""
    b = x.shape[0]
    hid = rnn.hidden_size
    zeros = x.new_zeros(1, b, hid)
    for k in range(rnn.num_layers):
        cell = getattr(rnn, f"l{k}")
        if k > 0 and rnn.dropout > 0 and rnn.training:
            x = F.dropout(x, rnn.dropout, training=True)
        w_ih, b_ih = _effective(cell.ih)
        w_hh, b_hh = _effective(cell.hh)
        with torch.no_grad():
            weights = [w_ih.detach(), w_hh.detach()] + ([b_ih.detach(), b_hh.detach()] if b_ih is not None else [])
            h_seq = torch._VF.lstm(x.detach(), (zeros, zeros), weights, b_ih is not None, 1, 0.0, False, False,
                                   True)[0]
            h_prev = torch.cat([h_seq.new_zeros(b, 1, hid), h_seq[:, :-1]], dim=1)
        gates = cell.ih(x) + cell.hh(h_prev)
        x = _LSTMRecurrence.apply(gates, w_hh.detach())
    return x


__all__ = ["SequenceLinear", "fused_dplstm_forward", "is_fused", "make_fused"]
