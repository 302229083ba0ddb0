"""Training losses (full softmax, sampled softmax with logQ correction, NCE) and full-softmax evaluation helpers.

All training losses return one loss per sequence [B]: the mean over that sequence's valid target tokens
(0 for a sequence without valid targets), as Opacus needs per-sample losses. `token_count(mask)` gives the
number of valid targets. Inputs: features [B,T,H] (from `model.features`), output weight [V,H] and bias [V]
(`model.output_weight()`, `model.output_bias()`), targets [B,T] (long), mask [B,T] (bool, target valid).

This module is the one place that turns scores into training losses: `token_losses` holds the math of every
kind ("full", "sampled_softmax", "nce"), for any layout of positions (the flat valid positions used here, or the
dense [B, T] grid of the device's Opacus-visible output head in pflm.device.dpsgd). `compute_loss` is the one
dispatcher from a model and a `LossConfig` to per-sequence losses (used by the device trainer and the tests), and
`mean_token_loss` the batch mean that the device optimises. With Opacus hooks on the model, kind "full" calls the
model (so the hooks see the output layer) and the sampled kinds are refused: device DP-SGD computes them through
its own output head (pflm.device.dpsgd) with the same `token_losses`.

Sampled losses draw k noise words once per call, shared by the whole batch, from a unigram^alpha
distribution q, and only gather the k + (#targets) rows of the output layer, so memory does not scale with V.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from pflm.errors import ConfigError

LOSS_KINDS = ("full", "sampled_softmax", "nce")  # the names of `device.loss`
_KIND_ALIASES = {"sampled": "sampled_softmax"}


@dataclass
class LossConfig:
    """Device training loss. kind: "full" | "sampled_softmax" (alias "sampled") | "nce"; num_samples = k noise
    words per batch; unigram_alpha: noise q(w) proportional to count(w)^alpha; nce_log_z: the fixed
    self-normalisation constant log Z used by NCE (0 = self-normalised model)."""

    kind: str = "full"
    num_samples: int = 1024
    unigram_alpha: float = 0.75
    nce_log_z: float = 0.0

    def __post_init__(self) -> None:
        self.kind = _KIND_ALIASES.get(self.kind, self.kind)
        if self.kind not in LOSS_KINDS:
            raise ConfigError(f"loss.kind must be one of {list(LOSS_KINDS)}, got {self.kind!r}")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples <= 0:
            raise ConfigError(f"loss.num_samples must be a positive integer, got {self.num_samples!r}")
        if not isinstance(self.unigram_alpha, (int, float)) or not 0.0 <= self.unigram_alpha <= 1.0:
            raise ConfigError(f"loss.unigram_alpha must be in [0, 1], got {self.unigram_alpha!r}")
        if not isinstance(self.nce_log_z, (int, float)) or not np.isfinite(self.nce_log_z):
            raise ConfigError(f"loss.nce_log_z must be a finite number, got {self.nce_log_z!r}")


def token_count(mask: torch.Tensor) -> int:
    """Number of valid target tokens in the batch."""
    return int(mask.sum().item())


def _valid_positions(features: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten to the N valid positions: (h [N,H], targets [N], sequence index [N], per-sequence counts [B])."""
    mask = mask.bool()
    seq = mask.nonzero(as_tuple=True)[0]
    return features[mask], targets[mask], seq, mask.sum(dim=1)


def _per_sequence_mean(tok: torch.Tensor, seq: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean [B] of the per-token losses [N] of the flat valid positions (sequence index `seq`)."""
    total = torch.zeros(counts.shape[0], dtype=tok.dtype, device=tok.device)
    total = total.index_add(0, seq, tok)
    return total / counts.clamp(min=1).to(tok.dtype)


def masked_sequence_mean(tok: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean [B] of dense per-token losses [B, T] over the positions where mask is True."""
    tok = torch.where(mask, tok, torch.zeros_like(tok))
    return tok.sum(1) / mask.sum(1).clamp(min=1).to(tok.dtype)


def token_losses(kind: str, targets: torch.Tensor, scores: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
                 noise: torch.Tensor | None = None, sampler: UnigramSampler | None = None,
                 log_z: float | torch.Tensor = 0.0, remove_accidental_hits: bool = True) -> torch.Tensor:
    """Per-token training loss with the shape of `targets` (any leading shape [...]): the math of every kind.

    kind "full": scores = logits [..., V], loss = cross entropy. kind "sampled_softmax" / "nce": scores =
    (s_t [...], s_n [..., k]), the scores of each position's target and of the k noise words `noise` [k] drawn
    from `sampler` (shared by all positions); see `sampled_softmax_loss` and `nce_loss` for the estimators."""
    if kind == "full":
        assert isinstance(scores, torch.Tensor)
        return F.cross_entropy(scores.reshape(-1, scores.shape[-1]), targets.reshape(-1),
                               reduction="none").view_as(targets)
    if kind not in LOSS_KINDS:
        raise ConfigError(f"loss kind must be one of {list(LOSS_KINDS)}, got {kind!r}")
    if sampler is None or noise is None:
        raise ConfigError(f"loss.kind={kind!r} needs a UnigramSampler (noise distribution) and noise words")
    s_t, s_n = scores
    log_k = float(np.log(noise.numel()))
    if kind == "sampled_softmax":
        s_n = s_n - (sampler.log_q(noise) + log_k)
        if remove_accidental_hits:
            s_n = s_n.masked_fill(noise == targets.unsqueeze(-1), float("-inf"))
        else:
            s_t = s_t - (sampler.log_q(targets) + log_k)  # target also counted among noise: correct it like noise
        logits = torch.cat([s_t.unsqueeze(-1), s_n], dim=-1)
        return torch.logsumexp(logits, dim=-1) - s_t
    d_t = s_t - log_z - (sampler.log_q(targets) + log_k)
    d_n = s_n - log_z - (sampler.log_q(noise) + log_k)
    return F.softplus(-d_t) + F.softplus(d_n).sum(dim=-1)


def full_softmax_loss(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Exact cross entropy, mean over each sequence's valid targets -> [B]."""
    h, t, seq, counts = _valid_positions(features, targets, mask)
    return _per_sequence_mean(token_losses("full", t, F.linear(h, weight, bias)), seq, counts)


class UnigramSampler:
    """Noise distribution q(w) proportional to max(count(w), min_count)^alpha, with ids in `exclude` (e.g. pad)
    given q = 0. min_count > 0 keeps q(w) > 0 for words unseen in the prior so log q is finite for targets.
    Draws use torch.multinomial with replacement."""

    def __init__(self, counts: np.ndarray | torch.Tensor, alpha: float = 0.75, min_count: float = 1.0,
                 exclude: tuple[int, ...] | list[int] = ()) -> None:
        c = torch.as_tensor(np.asarray(counts, dtype=np.float64) if not isinstance(counts, torch.Tensor)
                            else counts.detach().double().cpu())
        if c.ndim != 1 or c.numel() == 0:
            raise ConfigError("UnigramSampler counts must be a non-empty 1-D array (one count per vocab id)")
        if bool((c < 0).any()) or not bool(torch.isfinite(c).all()):
            raise ConfigError("UnigramSampler counts must be finite and >= 0")
        if not 0.0 <= alpha <= 1.0 or min_count < 0:
            raise ConfigError(f"UnigramSampler needs 0 <= alpha <= 1 and min_count >= 0 (got {alpha}, {min_count})")
        w = c.clamp(min=min_count).pow(alpha)
        if exclude:
            w[torch.as_tensor(list(exclude), dtype=torch.long)] = 0.0
        if not float(w.sum()) > 0:
            raise ConfigError("UnigramSampler has no word with positive probability; check counts/exclude")
        self.probs = (w / w.sum()).float()
        self._log_probs = torch.log(self.probs)
        self.vocab_size = int(c.numel())
        self.alpha = alpha

    def sample(self, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """k noise ids (with replacement), LongTensor [k]."""
        return torch.multinomial(self.probs, k, replacement=True, generator=generator)

    def log_q(self, ids: torch.Tensor) -> torch.Tensor:
        """log q(w) for ids (any shape), on the ids' device."""
        return self._log_probs.to(ids.device)[ids]


def _gather_scores(h: torch.Tensor, t: torch.Tensor, noise: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores s(w) = h.w + b for targets [N] and shared noise [N,k]; gathers only the needed rows."""
    w_t, w_n = weight[t], weight[noise]
    s_t = (h * w_t).sum(-1)
    s_n = h @ w_n.T
    if bias is not None:
        s_t = s_t + bias[t]
        s_n = s_n + bias[noise]
    return s_t, s_n


def sampled_softmax_loss(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor, mask: torch.Tensor, sampler: UnigramSampler, num_samples: int,
                         generator: torch.Generator | None = None,
                         remove_accidental_hits: bool = True) -> torch.Tensor:
    """Sampled softmax over {target} + k shared noise words with the logQ correction -> [B].

    Noise logits are s(w) - log(k q(w)) (k q(w) = expected count of w among the k draws); noise equal to the
    target is removed (masked to -inf). The target is in the candidate set with probability 1, so its logit
    is not corrected. The normaliser exp(s_t) + sum_{noise != t} exp(s_n) / (k q_n) is then an unbiased
    estimate of Z = sum_w exp(s_w), and the loss log(Z_hat) - s_t is consistent for the full cross entropy:
    its gradient is biased for finite k (log of an estimate) but converges to the full-softmax gradient.
    (Correcting the target by -log(k q_t) as well while removing accidental hits would drop the target's
    share p_t of the normaliser gradient: an O(p_t) bias that does not vanish with k.)
    """
    h, t, seq, counts = _valid_positions(features, targets, mask)
    noise = sampler.sample(num_samples, generator=generator).to(t.device)
    scores = _gather_scores(h, t, noise, weight, bias)
    tok = token_losses("sampled_softmax", t, scores, noise, sampler, remove_accidental_hits=remove_accidental_hits)
    return _per_sequence_mean(tok, seq, counts)


def nce_loss(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
             mask: torch.Tensor, sampler: UnigramSampler, num_samples: int,
             generator: torch.Generator | None = None, log_z: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Noise-contrastive estimation -> [B]: classify the target against k shared noise words.

    With Delta(w) = s(w) - log Z - log(k q(w)), each token's loss is
    -log sigmoid(Delta(target)) - sum_noise log(1 - sigmoid(Delta(n))).
    The model p(w) = exp(s(w) - log Z) is self-normalised: log Z is a constant, 0 by default, or a learned
    scalar tensor the caller owns (gradients flow into it). Noise words equal to the target are kept (NCE's
    derivation samples noise independently of data). In expectation over noise, d loss / d s(w) is
    k q(w) / (p(w) + k q(w)) * (p(w) - [w = target]), which tends to the full-softmax gradient
    p(w) - [w = target] as k q(w) >> p(w) when the model is normalised (sum_w p(w) = 1).
    """
    h, t, seq, counts = _valid_positions(features, targets, mask)
    noise = sampler.sample(num_samples, generator=generator).to(t.device)
    scores = _gather_scores(h, t, noise, weight, bias)
    return _per_sequence_mean(token_losses("nce", t, scores, noise, sampler, log_z=log_z), seq, counts)


def _opacus_hooked(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "autograd_grad_sample_hooks", None))


def compute_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                 cfg: LossConfig, sampler: UnigramSampler | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-sequence training loss [B] of a LanguageModel on (inputs, targets, mask) for a LossConfig.

    THE loss dispatcher (the device trainer calls it too). Kind "full" on a model carrying Opacus hooks calls
    the model (not features + output_weight) so the hooks see the output layer."""
    if cfg.kind == "full":
        if _opacus_hooked(model):
            logits = model(inputs)
            h_mask = mask.bool()
            seq = h_mask.nonzero(as_tuple=True)[0]
            tok = token_losses("full", targets[h_mask], logits[h_mask])
            return _per_sequence_mean(tok, seq, h_mask.sum(dim=1))
        feats = model.features(inputs)  # type: ignore[operator]
        return full_softmax_loss(feats, model.output_weight(), model.output_bias(),  # type: ignore[operator]
                                 targets, mask)
    if sampler is None:
        raise ConfigError(f"loss.kind={cfg.kind!r} needs a UnigramSampler (noise distribution)")
    if _opacus_hooked(model):
        # Opacus hooks only see module calls; rows gathered from the output matrix would be missing from the
        # per-sample gradients (silently wrong for tied models), so refuse instead.
        raise ConfigError(f"loss.kind={cfg.kind!r} is not supported with Opacus DP-SGD (per-sample gradients);"
                          " use loss.kind=full for DP-SGD, or sampled/nce with central (user-level) DP only")
    feats = model.features(inputs)  # type: ignore[operator]
    weight, bias = model.output_weight(), model.output_bias()  # type: ignore[operator]
    if cfg.kind == "sampled_softmax":
        return sampled_softmax_loss(feats, weight, bias, targets, mask, sampler, cfg.num_samples, generator)
    return nce_loss(feats, weight, bias, targets, mask, sampler, cfg.num_samples, generator, cfg.nce_log_z)


def mean_token_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                    cfg: LossConfig, sampler: UnigramSampler | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean loss over the batch's valid target tokens (= token-weighted mean of `compute_loss`'s per-sequence
    means): what a device optimises. The full softmax takes a direct path: logits only at the valid positions,
    one cross entropy, no per-sequence bookkeeping."""
    if cfg.kind == "full" and not _opacus_hooked(model):
        feats = model.features(inputs)  # type: ignore[operator]
        return F.cross_entropy(F.linear(feats[mask], model.output_weight(), model.output_bias()),  # type: ignore[operator]
                               targets[mask])
    per_seq = compute_loss(model, inputs, targets, mask, cfg, sampler, generator)
    ntok = mask.sum(1)
    return (per_seq * ntok).sum() / ntok.sum()


# ----- evaluation (exact full softmax) ------------------------------------------------------------------------

def token_nll(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
              max_logits: int = 1 << 24) -> torch.Tensor:
    """Exact per-token negative log-likelihood [B,T] (0 where mask is False), with the full softmax.

    Features are computed once; logits are materialised for at most `max_logits` elements at a time
    (chunks over time), so [B,T,V] is never built for a huge V.
    """
    feats = model.features(inputs)  # type: ignore[operator]
    weight, bias = model.output_weight(), model.output_bias()  # type: ignore[operator]
    b, t_len, _ = feats.shape
    v = weight.shape[0]
    step = max(1, max_logits // max(1, b * v))
    out = torch.zeros(b, t_len, dtype=feats.dtype, device=feats.device)
    for start in range(0, t_len, step):
        sl = slice(start, start + step)
        logits = F.linear(feats[:, sl], weight, bias)
        lp = torch.log_softmax(logits.float(), dim=-1)
        nll = -lp.gather(-1, targets[:, sl].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        out[:, sl] = torch.where(mask[:, sl].bool(), nll.to(out.dtype), torch.zeros_like(nll, dtype=out.dtype))
    return out


def sequence_logprobs(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor,
                      max_logits: int = 1 << 24) -> torch.Tensor:
    """Sum of log p(tokens[:, t] | tokens[:, <t]) over t >= 1 where mask[:, t] is True -> [B].

    tokens [B,T] start with a context token (e.g. BOS) at position 0, which is never scored; mask [B,T]
    marks real (non-pad) tokens. Uses the exact full softmax, chunked over time (see token_nll).
    """
    nll = token_nll(model, tokens[:, :-1], tokens[:, 1:], mask[:, 1:], max_logits=max_logits)
    return -nll.sum(dim=1)
