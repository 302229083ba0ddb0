"""The federated server: plans each round (cohort, PEU rows, device model) and applies the private aggregate.

It never sees an individual update: it receives an `AggregateResult` (a sum) from an aggregator, runs the
server-side postprocessors (Gaussian noise, adaptive clipping), averages, steps the server optimizer and
the privacy accountant. The in-process simulator and the Flower ServerApp both drive this class.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from pflm.config import RecipeConfig
from pflm.device.layout import Layout, trainable_names
from pflm.device.spec import DeviceSpec
from pflm.model.factory import build_model
from pflm.model.prior import init_output_bias
from pflm.privacy.base import Postprocessor
from pflm.round import AggregateResult, RoundContext, RoundPlan
from pflm.privacy.mechanism import build_mechanism
from pflm.server.ema import IterateAverage
from pflm.server.lora_refresh import fold_and_restart
from pflm.server.optimizer import ServerOptimizer
from pflm.server.peu import RowSelector
from pflm.secure_random import SecureRandom, subkey
from pflm.server.ledger import ReleaseLedger, release_digest
from pflm.server.participation import ParticipationScheduler
from pflm.server.sampling import sample_cohort


class FederatedServer:
    def __init__(
        self,
        cfg: RecipeConfig,
        vocab_size: int,
        population: int,
        prior_counts: np.ndarray | None,
        run_key: bytes,
        data_privacy: dict | None = None,
        ledger: ReleaseLedger | None = None,
    ) -> None:
        """`run_key` is the run's secret (cohorts, noise); `data_privacy` the data's privacy manifest section
        (DP releases made while preparing it); `ledger` records releases so redone rounds are charged right."""
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.population = population
        torch.manual_seed(cfg.seed)
        self.device_spec = DeviceSpec.from_recipe(cfg, vocab_size)  # all a device learns of the recipe
        self.model = build_model(cfg.model, vocab_size)
        self.params = dict(self.model.named_parameters())
        self.vocab_names = set(self.model.vocab_parameters())
        names = trainable_names(self.model, cfg.model.lora.rank, cfg.device.train_embeddings)
        self.global_layout = Layout(self.model, names)
        self.prior_counts = None if prior_counts is None else np.asarray(prior_counts, dtype=np.float64)
        if cfg.server.init_output_bias == "prior" and prior_counts is not None:
            self._init_bias_from_prior(self.prior_counts)
        if cfg.server.zero_output_weight:
            with torch.no_grad():
                self.model.output_weight().zero_()
        if cfg.server.init_from:  # public pretrained weights only (refused without public provenance)
            from pflm.model.pretrained import load_pretrained, manifest_tokenizer_sha256

            load_pretrained(self.model, cfg.server.init_from, manifest_tokenizer_sha256(cfg.data.dir))
        self.selector = RowSelector(cfg.peu, vocab_size, prior_counts, cfg.seed)
        self.optimizer = ServerOptimizer(cfg.server)
        self.privacy = build_mechanism(cfg, population, run_key, data_privacy, release_dim=self.release_dim())
        self.cohort_rng = SecureRandom(subkey(run_key, "cohort-sampling"))
        s = cfg.server
        self.participation = None if s.sampling != "available" else ParticipationScheduler(
            population, s.cohort_size, s.availability, s.min_separation, s.max_participations, self.cohort_rng)
        self.participation_stats: dict[int, dict[str, int]] = {}  # per round; not in RELEASED: diagnostics only
        self.ledger = ledger
        self.ledger_key = subkey(run_key, "ledger-pre-noise-digest")
        self.postprocessors: list[Postprocessor] = self.privacy.postprocessors
        self.rounds_done = 0
        self.ema = IterateAverage(self.model, cfg.server.ema_decay) if cfg.server.ema_decay > 0 else None

    def released_model(self) -> torch.nn.Module:
        """The model the run publishes and evaluates: the iterate average if `server.ema_decay`, else the
        last iterate (devices always train from the last iterate)."""
        return self.model if self.ema is None else self.ema.averaged_model(self.model)

    @torch.no_grad()
    def _init_bias_from_prior(self, prior: np.ndarray) -> None:
        """Output bias = log unigram prior, so rows no device ever trains (PEU) keep a sensible probability under
        the full softmax instead of a uniform share. The prior is public or DP (the simulator refuses others)."""
        if prior.shape == (self.vocab_size,):
            init_output_bias(self.model, prior)

    # ---- round planning -------------------------------------------------------------------------------------
    def pending_releases(self, round_idx: int) -> int:
        """Releases round `round_idx` may be charged if run now (1, or more when a resume redoes it)."""
        return 1 + (self.ledger.releases_of(round_idx) if self.ledger is not None else 0)

    def plan_round(self, round_idx: int) -> RoundPlan:
        if self.participation is not None:  # no secret sampling: availability + (k, b) limits
            cohort, self.participation_stats[round_idx] = self.participation.cohort(round_idx)
        else:
            cohort = sample_cohort(self.population, self.cfg.server.cohort_size, self.cfg.server.sampling,
                                   self.cohort_rng, round_idx)
        rows = self.selector.select(round_idx)
        ctx = RoundContext(
            round=round_idx, dim=self.release_dim(), cohort=cohort, clip_bound=self.privacy.clip_bound_for(round_idx),
            seed=self.cfg.seed,
        )
        return RoundPlan(round_idx, cohort, rows, self.device_state(rows), ctx, self.device_spec)

    def release_dim(self) -> int:
        k = self.selector.k
        return sum(e.numel // e.shape[0] * k if e.vocab_axis else e.numel for e in self.global_layout.entries)

    @torch.no_grad()
    def device_state(self, rows: torch.Tensor | None) -> dict[str, torch.Tensor]:
        state = {}
        for name, t in self.model.state_dict().items():
            state[name] = t[rows] if (rows is not None and name in self.vocab_names) else t
        return state

    # ---- applying the aggregate -----------------------------------------------------------------------------
    def finish_round(self, plan: RoundPlan, agg: AggregateResult) -> dict[str, float]:
        """Noise → record the release → average → server step → account. Returns round metrics (the exact
        contributor count among them is private under Poisson sampling: the caller keeps it out of metrics)."""
        metrics: dict[str, float] = {"contributors": agg.num_contributors}
        if self.participation is not None:
            metrics.update(self.participation_stats.pop(plan.round, {}))
        ctx, pre = plan.ctx, ""
        if self.ledger is not None and self.privacy.private:  # a redo with a new aggregate gets fresh noise
            pre = release_digest(agg, ctx.clip_bound, self.ledger_key)
            ctx = dataclasses.replace(ctx, release_attempt=self.ledger.attempt(plan.round, pre))
        for pp in self.postprocessors:
            agg, m = pp.on_server(agg, ctx)
            metrics.update(m)
        releases = 1
        if self.ledger is not None and self.privacy.private:
            releases = self.ledger.record(plan.round, release_digest(agg, ctx.clip_bound), pre, ctx.release_attempt)
            if releases > 1:
                metrics["releases_of_round"] = releases  # redone after a resume with a different result
        if self.cfg.server.weighting == "uniform":
            # DP: divide by the expected cohort (public); the realised count is private under Poisson sampling.
            denom = float(self.cfg.server.cohort_size) if self.privacy.private else float(max(agg.num_contributors, 1))
        else:
            denom = max(agg.weight_sum, 1e-12)
        avg = agg.total / denom
        metrics["update_norm"] = float(avg.norm())
        self._apply(avg, plan.rows)
        if self.cfg.server.lr_schedule != "constant":
            metrics["server_lr"] = self.optimizer.lr_at(self.optimizer.steps)  # public schedule
        if getattr(self.privacy, "distributed", None) is not None:  # distributed DP charges the survivors' noise
            metrics.update(self.privacy.account_round(releases, agg.num_contributors, len(plan.cohort)))
        else:
            metrics.update(self.privacy.account_round(releases))
        every = self.cfg.server.lora_merge_every
        if every and self.cfg.model.lora.rank > 0 and (plan.round + 1) % every == 0:
            fold_and_restart(self.model, self.cfg.seed, plan.round)
            self.optimizer.reset([n for n in self.params if "lora_" in n])
        if self.ema is not None:
            self.ema.update(self.model)
        self.rounds_done = plan.round + 1
        return metrics

    def _apply(self, avg: torch.Tensor, rows: torch.Tensor | None) -> None:
        updates, off = {}, 0
        for e in self.global_layout.entries:
            shape = e.shape
            if e.vocab_axis and rows is not None:
                shape = (rows.numel(), *e.shape[1:])
            n = int(np.prod(shape))
            updates[e.name] = (avg[off : off + n].view(shape), rows if e.vocab_axis else None)
            off += n
        assert off == avg.numel(), (off, avg.numel())
        self.optimizer.step(self.params, updates)

    # ---- state for checkpoints -----------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"model::{k}": v for k, v in self.model.state_dict().items()}
        out.update({f"opt::{k}": v for k, v in self.optimizer.state_tensors().items()})
        if self.ema is not None:
            out.update({f"ema::{k}": v for k, v in self.ema.state_tensors().items()})
        return out

    def state_json(self) -> dict:
        return {
            "rounds_done": self.rounds_done,
            "optimizer_steps": self.optimizer.steps,
            **({"ema_steps": self.ema.steps} if self.ema is not None else {}),
            "privacy": self.privacy.state_dict(),
        }

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        model_state = {k[len("model::"):]: v for k, v in tensors.items() if k.startswith("model::")}
        self.model.load_state_dict(model_state, strict=True)
        opt = {k[len("opt::"):]: v for k, v in tensors.items() if k.startswith("opt::")}
        self.optimizer.load_state_tensors(opt, meta["optimizer_steps"])
        self.privacy.load_state_dict(meta["privacy"])
        ema = {k[len("ema::"):]: v for k, v in tensors.items() if k.startswith("ema::")}
        if self.ema is not None:
            self.ema.load_state_tensors(ema, int(meta.get("ema_steps", 0)))
        elif ema:
            raise ValueError("the checkpoint holds an iterate average but server.ema_decay is 0")
        self.rounds_done = meta["rounds_done"]
