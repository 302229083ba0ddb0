"""The in-process simulator: sample → device updates → aggregate → noise → server step → validate, resumable.

Per-round randomness is derived from (run key, round[, user]) only — the run key is a secret kept in the run
directory (`pflm.server.run_key`) — so a run killed at any point and restarted from its last checkpoint redoes
exactly the same releases and ends with bit-identical weights; the release ledger charges a redone round again
only if its release differs. metrics.jsonl holds only DP-released or public values (`metrics.py`).
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
from tqdm import tqdm

from pflm.aggregator.base import Aggregator
from pflm.config import RecipeConfig, recipe_to_dict
from pflm.data.store import FederatedData, public_manifest, same_tokenizer
from pflm.device.trainer import DeviceTrainer
from pflm.errors import AggregationFailed, PflmError
from pflm.evaluation.perplexity import EvalSet, build_eval_set, evaluate, unigram_baseline
from pflm.io_utils import atomic_write_json, atomic_write_text
from pflm.privacy.clipping import NonFiniteUpdate
from pflm.privacy.setup import check_data_privacy
from pflm.secure_random import subkey
from pflm.server.ledger import ReleaseLedger
from pflm.server.run_key import load_or_create_run_key
from pflm.server.server import FederatedServer, RoundPlan
from pflm.simulation import artifacts
from pflm.simulation.checkpoint import load_checkpoint, save_checkpoint
from pflm.simulation.devices import DevicePool, thread_plan, torch_threads
from pflm.simulation.metrics import DIAGNOSTICS_FILE, RoundLog

EVAL_MAX_TOKENS = 120


def make_aggregator(cfg: RecipeConfig, run_key: bytes | None = None) -> Aggregator:
    if cfg.aggregation.kind == "secure":
        from pflm.aggregator.secagg import make_secure_aggregator

        return make_secure_aggregator(cfg.aggregation.secagg, seed=cfg.seed, run_key=run_key)
    from pflm.aggregator.plain import PlainSumAggregator

    return PlainSumAggregator()


def load_eval_set(fd: FederatedData, split: str, max_users: int, max_tokens: int = EVAL_MAX_TOKENS) -> EvalSet:
    n = fd.num_users(split)
    users = range(n if max_users == 0 else min(n, max_users))
    sents, texts = [], []
    for u in users:
        sents.extend(fd.user_tokens(split, u))
        texts.extend(fd.user_texts(split, u))
    return build_eval_set(sents, texts, max_tokens)


def run_device(
    trainer: DeviceTrainer, server: FederatedServer, plan: RoundPlan, user: int, sentences, device_key: bytes
) -> tuple:
    """One device's whole contribution: local training (its randomness from `device_key`, a secret), then the
    device-side postprocessors (clipping…)."""
    res = trainer.train(user, sentences, device_key)
    vec, aux = res.update, {}
    for pp in server.postprocessors:
        vec, a = pp.on_device(vec, plan.ctx)
        aux.update(a)
    if trainer.cfg.server.weighting == "tokens":
        vec = vec * res.weight
    return res, vec, aux


class Simulator:
    local_devices = True  # False where devices train elsewhere (Flower): one trainer, no device threads

    def __init__(self, cfg: RecipeConfig) -> None:
        if not cfg.data.dir:
            raise PflmError("recipe has no data directory; pass data.dir=DIR (a `pflm prepare` output)")
        self.cfg = cfg
        workers, self.torch_threads, self.all_threads = thread_plan(cfg)
        if not self.local_devices:
            workers, self.torch_threads = 1, self.all_threads
        torch.set_num_threads(self.torch_threads)
        self.fd = FederatedData.open(cfg.data.dir)
        self.vocab_size = self.fd.tokenizer.vocab_size
        n_train = self.fd.num_users("train")
        self.population = n_train if cfg.data.train_users == 0 else min(n_train, cfg.data.train_users)
        if cfg.server.cohort_size > self.population:
            raise PflmError(
                f"server.cohort_size={cfg.server.cohort_size} exceeds the {self.population} training users; "
                "lower the cohort or prepare more users"
            )
        self.data_privacy = self.fd.privacy_info
        check_data_privacy(cfg, self.data_privacy, cfg.data.dir)
        counts = self.fd.prior_counts()  # public or DP prior: PEU row choice, NCE noise, output-bias init
        self.run_dir = cfg.run_dir
        self._check_compatible_run()
        self.run_key = load_or_create_run_key(self.run_dir, cfg.privacy.reproducible, cfg.seed)
        self.server = FederatedServer(
            cfg, self.vocab_size, self.population, counts, self.run_key, self.data_privacy, ReleaseLedger(self.run_dir)
        )
        self.devices = DevicePool(cfg, self.vocab_size, counts, workers)
        self.trainer = self.devices.trainers[0]
        self.aggregator = make_aggregator(cfg, self.run_key)
        self.aggregator.concurrent_uploads = workers
        self.val_set = load_eval_set(self.fd, "val", cfg.data.val_users)
        self.metrics_path = self.run_dir / "metrics.jsonl"

    def _check_compatible_run(self) -> None:
        ptr = self.run_dir / artifacts.DATA_INFO_FILE
        if ptr.exists():
            old = json.loads(ptr.read_text())
            if not same_tokenizer(old, self.fd.manifest):
                raise PflmError(
                    f"{self.run_dir} was trained with a different tokenizer than {self.cfg.data.dir}; "
                    "use a new name=... or the original data.dir"
                )

    # -------------------------------------------------------------------------------------------------------
    def _resume(self) -> int:
        ck = load_checkpoint(self.run_dir)
        done = 0
        if ck is not None:
            tensors, meta = ck
            self.server.load_state(tensors, meta)
            done = self.server.rounds_done
        for path in (self.metrics_path, self.run_dir / DIAGNOSTICS_FILE):
            if path.exists():  # drop rows of rounds after the checkpoint (they will be redone; the ledger
                # remembers what they released)
                keep = [ln for ln in path.read_text().splitlines()
                        if ln and (ln.startswith("#") or json.loads(ln)["round"] < done)]
                atomic_write_text(path, "".join(ln + "\n" for ln in keep))
        return done

    def _checkpoint(self, extra: dict | None = None) -> None:
        meta = self.server.state_json()
        meta.update(extra or {})
        save_checkpoint(self.run_dir, self.server.rounds_done, self.server.state_tensors(), meta)

    def run_round(self, r: int) -> dict:
        t0 = time.perf_counter()
        if torch.get_num_threads() != self.torch_threads:  # another component of this process changed it
            torch.set_num_threads(self.torch_threads)
        server, agg, fd = self.server, self.aggregator, self.fd
        plan = server.plan_round(r)
        self.devices.load_round(r, plan.device_state, plan.rows)
        agg.begin(plan.ctx)

        def device(trainer: DeviceTrainer, user: int) -> tuple:
            """Everything one device does: train, clip, and prepare its upload (runs on a device worker)."""
            key = subkey(self.run_key, "device", r, user)
            res, vec, aux = run_device(trainer, server, plan, user, fd.user_tokens("train", user), key)
            return res, agg.upload(user, vec, res.weight, aux)

        nonfinite, losses, tokens = 0, 0.0, 0
        device_eps: list[float] = []  # sample-level ε of each device's DP-SGD (not the user-level ε)
        for user, out in self.devices.map(device, plan.cohort):  # in cohort order: the sum is order-exact
            if isinstance(out, NonFiniteUpdate):
                nonfinite += 1
                agg.drop(user)
                continue
            if isinstance(out, BaseException):
                raise out
            res, upload = out
            agg.receive(upload)
            if "device_sample_epsilon" in res.metrics:
                device_eps.append(float(res.metrics["device_sample_epsilon"]))
            losses += res.train_loss * res.num_tokens
            tokens += res.num_tokens
        m = {"round": r, "cohort": len(plan.cohort), "nonfinite_dropped": nonfinite}
        if device_eps:  # a different guarantee from the user-level "epsilon": per sentence, per device and round
            m["device_sample_epsilon_max"] = max(device_eps)
            m["device_sample_epsilon_median"] = float(np.median(device_eps))
        return self.close_round(plan, m, t0, losses, tokens)

    def close_round(self, plan: RoundPlan, m: dict, t0: float, losses: float, tokens: int) -> dict:
        """Finalize the aggregate, apply it on the server and complete the round's metrics. A failed
        aggregation leaves model and accountant untouched. Shared with the Flower ServerApp."""
        try:
            result = self.aggregator.finalize()
        except AggregationFailed as e:
            m.update({"failed": str(e), "seconds": time.perf_counter() - t0})
            return m
        m.update(result.metrics)
        if "clipped" in result.aux and result.num_contributors:  # exact: diagnostics only (metrics.py)
            m["fraction_clipped"] = result.aux["clipped"] / result.num_contributors
        m.update(self.server.finish_round(plan, result))
        m["train_loss"] = losses / max(tokens, 1)
        m["seconds"] = time.perf_counter() - t0
        return m

    def run(self, progress: bool = True) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        artifacts.write_run_metadata(self.run_dir, cfg, self.fd.tokenizer.path, public_manifest(self.fd.manifest))
        start = self._resume()
        stop_reason = None
        rounds = cfg.server.rounds
        bar = tqdm(total=rounds, initial=start, desc=cfg.name, disable=not progress, unit="round")
        last_val = None
        with RoundLog(self.run_dir, self.server.privacy.private, cfg.diagnostics) as log:
            for r in range(start, rounds):
                reason = self.server.privacy.stop_reason(r, self.server.pending_releases(r))
                if reason:
                    stop_reason = reason
                    break
                m = self.run_round(r)
                if (r + 1) % cfg.server.eval_every == 0 or r + 1 == rounds:
                    with torch_threads(self.all_threads):
                        last_val = evaluate(self.server.model, self.val_set)
                    m["val_perplexity"] = last_val["perplexity"]
                    m["val_word_perplexity"] = last_val["word_perplexity"]
                shown = log.write(m)
                bar.update(1)
                bar.set_postfix({k: round(v, 3) for k, v in shown.items() if k in ("train_loss", "val_perplexity", "epsilon")})
                if (r + 1) % cfg.server.checkpoint_every == 0 or r + 1 == rounds:
                    self._checkpoint()
        bar.close()
        if stop_reason:
            tqdm.write(f"[pflm] {stop_reason}")
            self._checkpoint({"stop_reason": stop_reason})
        return self.finish(time.perf_counter() - t_start, stop_reason)

    def finish(self, wall: float, stop_reason: str | None) -> dict:
        cfg, model = self.cfg, self.server.model
        artifacts.export_model(self.run_dir, model)
        test_set = load_eval_set(self.fd, "test", cfg.data.test_users)
        with torch_threads(self.all_threads):  # one model: all threads (device workers each had fewer)
            val = evaluate(model, self.val_set)
            test = evaluate(model, test_set)
        priv = self.server.privacy.summary()
        # The unigram baseline uses the same public or DP prior the server holds, never the exact train counts.
        uni = unigram_baseline(self.server.prior_counts, test_set) if self.server.prior_counts is not None else None
        summary = {
            "name": cfg.name,
            "val_perplexity": val["perplexity"],
            "val_word_perplexity": val["word_perplexity"],
            "test_perplexity": test["perplexity"],
            "test_word_perplexity": test["word_perplexity"],
            "unigram_test_perplexity": uni["perplexity"] if uni else None,
            "unigram_test_word_perplexity": uni["word_perplexity"] if uni else None,
            "test_tokens": test["tokens"],
            "test_sentences": test["sentences"],
            "rounds": self.server.rounds_done,
            "rounds_planned": cfg.server.rounds,
            "cohort_size": cfg.server.cohort_size,
            "population": self.population,
            "clip_bound": cfg.privacy.clip_bound,
            "params": sum(p.numel() for p in model.parameters()),
            "release_dim": self.server.release_dim(),
            "wall_seconds": wall,
            "stop_reason": stop_reason,
            "recipe": recipe_to_dict(cfg),
            **priv,
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
        return summary
