"""Server optimizers: apply the noised average update (a pseudo-gradient) to the global weights, row-sparse aware."""

from __future__ import annotations

import math

import torch

from pflm.config import ServerConfig


class ServerOptimizer:
    """FedAvg (w += lr·Δ̄), FedAvgM (heavy-ball momentum) or FedAdam (Reddi et al. 2021) over named global tensors.

    `updates` maps a parameter name to (Δ̄, rows): rows=None updates the whole tensor; otherwise Δ̄ holds only the
    listed rows (dim 0), and only those rows of the weights (and of the Adam moments) change. With momentum β > 0
    (FedAvgM, Hsu et al. 2019; the server optimizer of the BLT and Gboard DP-FTRL papers) the step is
    m ← β·m + Δ̄, w ← w + lr·m on the whole tensor: rows absent from this round's Δ̄ get a zero update, so their
    buffer decays and still moves them. The model stays a fixed linear map of the released updates (what DP-FTRL's
    noise cancellation needs); a row never released keeps m = 0 and never moves.
    """

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.state: dict[str, dict[str, torch.Tensor]] = {}
        self.steps = 0

    def lr_at(self, step: int) -> float:
        """The server lr of the step-th update (1-based): public, a function of the step count alone."""
        c = self.cfg
        if c.lr_schedule == "constant":
            return c.lr
        frac = min(max(step - 1, 0) / max(c.rounds - 1, 1), 1.0)
        return c.lr_final + (c.lr - c.lr_final) * 0.5 * (1.0 + math.cos(math.pi * frac))

    @torch.no_grad()
    def step(self, params: dict[str, torch.Tensor], updates: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> None:
        self.steps += 1
        lr = self.lr_at(self.steps)
        for name, (delta, rows) in updates.items():
            p = params[name]
            if self.cfg.optimizer == "fedavg" and self.cfg.momentum > 0:
                self._momentum_step(name, p, delta, rows, lr)
                continue
            if self.cfg.optimizer == "fedavg":
                if rows is None:
                    p.add_(delta.view_as(p), alpha=lr)
                else:
                    p.index_add_(0, rows, delta.to(p.dtype), alpha=lr)
                continue
            st = self.state.get(name)
            if st is None:
                st = self.state[name] = {"m": torch.zeros_like(p), "v": torch.zeros_like(p)}
            b1, b2 = self.cfg.beta1, self.cfg.beta2
            if rows is None:
                m, v = st["m"], st["v"]
                d = delta.view_as(p)
                m.mul_(b1).add_(d, alpha=1 - b1)
                v.mul_(b2).addcmul_(d, d, value=1 - b2)
                p.add_(m / (v.sqrt() + self.cfg.adam_eps), alpha=lr)
            else:
                m = st["m"][rows].mul_(b1).add_(delta, alpha=1 - b1)
                v = st["v"][rows].mul_(b2).addcmul_(delta, delta, value=1 - b2)
                st["m"][rows] = m
                st["v"][rows] = v
                p.index_add_(0, rows, m / (v.sqrt() + self.cfg.adam_eps), alpha=lr)

    def _momentum_step(self, name: str, p: torch.Tensor, delta: torch.Tensor, rows: torch.Tensor | None,
                       lr: float) -> None:
        st = self.state.get(name)
        if st is None:
            st = self.state[name] = {"buf": torch.zeros_like(p)}
        buf = st["buf"]
        buf.mul_(self.cfg.momentum)
        if rows is None:
            buf.add_(delta.view_as(p))
        else:
            buf.index_add_(0, rows, delta.to(p.dtype))
        p.add_(buf, alpha=lr)

    def reset(self, names: list[str]) -> None:
        """Forget the moments of these parameters (e.g. LoRA adapters that were just restarted)."""
        for n in names:
            self.state.pop(n, None)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, st in self.state.items():
            for k, t in st.items():
                out[f"{k}::{name}"] = t
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], steps: int) -> None:
        self.state = {}
        for key, t in tensors.items():
            k, name = key.split("::", 1)
            self.state.setdefault(name, {})[k] = t.clone()
        self.steps = steps
