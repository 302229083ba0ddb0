"""The run driver: one round loop for every backend — plan → fan-out → finalize → noise → server step → account.

`RunDriver(cfg, fanout)` owns everything about a run except where its devices train: the data, the server
(model, privacy mechanism, accountant), the aggregator, the run key, resume, checkpoints, metrics, evaluation
and summary.json. The device fan-out is injected (`LocalDevices` in this process, `FlowerNodes` over Flower), so
both backends share this loop and write the same artifacts.

Per-round randomness is derived from (run key, round[, user]) only — the run key is a secret kept in the run
directory (`pflm.server.run_key`) — so a run killed at any point and restarted from its last checkpoint redoes
exactly the same releases and ends with bit-identical weights; the release ledger charges a redone round again
only if its release differs. metrics.jsonl holds only DP-released or public values (`metrics.py`).
"""

from __future__ import annotations

import json
import time

import torch
from tqdm import tqdm

from pflm.aggregator.base import Aggregator
from pflm.config import RecipeConfig, recipe_to_dict
from pflm.data.store import FederatedData, public_manifest, same_tokenizer
from pflm.driver import artifacts
from pflm.driver.checkpoint import load_checkpoint, save_checkpoint
from pflm.driver.fanout import DeviceFanout
from pflm.driver.metrics import DIAGNOSTICS_FILE, RELEASED, RoundLog
from pflm.driver.recipe_check import recipe_changes
from pflm.driver.tensorboard import TensorBoardLog
from pflm.errors import AggregationFailed, NoContributions, PflmError
from pflm.evaluation.perplexity import evaluate, load_eval_set, unigram_baseline
from pflm.io_utils import atomic_write_json, atomic_write_text
from pflm.model.pretrained import check_public_weights, manifest_tokenizer_sha256
from pflm.privacy.mechanism import check_data_privacy
from pflm.round import AggregateResult, RoundPlan
from pflm.runtime import torch_threads
from pflm.server.ledger import ReleaseLedger
from pflm.server.run_key import load_or_create_run_key
from pflm.server.server import FederatedServer


def make_aggregator(cfg: RecipeConfig, run_key: bytes | None = None) -> Aggregator:
    if cfg.aggregation.kind == "secure":
        from pflm.aggregator.secagg import make_secure_aggregator

        return make_secure_aggregator(cfg.aggregation.secagg, seed=cfg.seed, run_key=run_key)
    from pflm.aggregator.plain import PlainSumAggregator

    return PlainSumAggregator()


def secagg_parameters(cfg: RecipeConfig, aggregator: Aggregator) -> str | None:
    """The SecAgg+ degree/threshold for the *expected* cohort (the realised one is private) with the
    assumptions behind them (Bell et al. 2020), as the run states them; None without secure aggregation."""
    config = getattr(aggregator, "config", None)
    if cfg.aggregation.kind != "secure" or config is None or cfg.server.cohort_size < 3:
        return None
    return config.parameters(cfg.server.cohort_size).describe()


class RunDriver:
    """Runs a recipe's rounds with the given device fan-out; `run()` trains (resuming) and returns the summary."""

    def __init__(self, cfg: RecipeConfig, fanout: DeviceFanout, data: FederatedData | None = None) -> None:
        """`data` replaces the recipe's data directory (the audit adds canary users to it: pflm/simulation/canaries.py)."""
        if not cfg.data.dir:
            raise PflmError("recipe has no data directory; pass data.dir=DIR (a `pflm prepare` output)")
        self.cfg = cfg
        self.fanout = fanout
        self.workers, self.torch_threads, self.all_threads = fanout.thread_split(cfg)
        torch.set_num_threads(self.torch_threads)
        self.fd = data if data is not None else FederatedData.open(cfg.data.dir)
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
        self.tensorboard = TensorBoardLog(self.run_dir, RELEASED) if cfg.logging.tensorboard else None
        if cfg.server.init_from:  # unusable starting weights are refused before the run directory gets a key file
            check_public_weights(cfg.server.init_from, manifest_tokenizer_sha256(cfg.data.dir))
        self._check_compatible_run()
        self.run_key = load_or_create_run_key(self.run_dir, cfg.privacy.reproducible, cfg.seed)
        self.server = FederatedServer(
            cfg, self.vocab_size, self.population, counts, self.run_key, self.data_privacy, ReleaseLedger(self.run_dir)
        )
        self.aggregator = make_aggregator(cfg, self.run_key)
        self.aggregator.concurrent_uploads = self.workers
        if getattr(self.server.privacy, "distributed", None) is not None:  # devices add noise shares (distributed DP)
            self.aggregator.codec_factory = self.server.privacy.distributed.codec_factory
        self.secagg_parameters = secagg_parameters(cfg, self.aggregator)
        self.val_set = load_eval_set(self.fd, "val", cfg.data.val_users)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        fanout.attach(self)

    def _check_compatible_run(self) -> None:
        self.recipe_changes = recipe_changes(self.run_dir, self.cfg, artifacts.RECIPE_FILE)
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
        """One round: plan → the fan-out trains the cohort into the aggregator → `close_round`."""
        t0 = time.perf_counter()
        if torch.get_num_threads() != self.torch_threads:  # another component of this process changed it
            torch.set_num_threads(self.torch_threads)
        plan = self.server.plan_round(r)
        self.aggregator.begin(plan.ctx)
        tally = self.fanout.train_round(plan, self.aggregator)
        m = {"round": r, **tally.metrics}
        return self.close_round(plan, m, t0, tally.loss_sum, tally.tokens)

    def close_round(self, plan: RoundPlan, m: dict, t0: float, losses: float, tokens: int) -> dict:
        """Finalize the aggregate, apply it on the server and complete the round's metrics. A failed
        aggregation leaves model and accountant untouched."""
        try:
            result = self.aggregator.finalize()
        except NoContributions as e:
            if not self._releases_empty_sums():
                m.update({"failed": str(e), "seconds": time.perf_counter() - t0})
                return m
            # Central DP releases Σ over the cohort + noise every round; over an empty set Σ = 0. Failing here
            # instead would publish "nobody contributed" (e.g. every update NaN), a fact about the data.
            result = AggregateResult(torch.zeros(plan.ctx.dim), 0.0, 0)
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

    def _releases_empty_sums(self) -> bool:
        """Whether a round without contributions is still released: with central noise, yes (the server adds
        the noise); with distributed noise the devices add it, so an empty round has nothing to release."""
        privacy = self.server.privacy
        return privacy.private and getattr(privacy, "distributed", None) is None

    def run(self, progress: bool = True) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        artifacts.write_run_metadata(self.run_dir, cfg, self.fd.tokenizer.path, public_manifest(self.fd.manifest))
        start = self._resume()
        stop_reason = None
        rounds = cfg.server.rounds
        bar = tqdm(total=rounds, initial=start, desc=cfg.name, disable=not progress, unit="round")
        last_val = None
        with RoundLog(self.run_dir, self.server.privacy.private, cfg.diagnostics, self.tensorboard) as log:
            for r in range(start, rounds):
                reason = self.server.privacy.stop_reason(r, self.server.pending_releases(r))
                if reason:
                    stop_reason = reason
                    break
                m = self.run_round(r)
                if self.recipe_changes and r == start:  # recorded once, with the first round run under them
                    m["recipe_changes"] = self.recipe_changes
                if (r + 1) % cfg.server.eval_every == 0 or r + 1 == rounds:
                    with torch_threads(self.all_threads):
                        last_val = evaluate(self.server.released_model(), self.val_set)
                        if self.server.ema is not None:  # released = iterate average: the last iterate beside it
                            m["last_iterate_val_word_perplexity"] = evaluate(
                                self.server.model, self.val_set)["word_perplexity"]
                    m["val_perplexity"] = last_val["perplexity"]
                    m["val_word_perplexity"] = last_val["word_perplexity"]
                shown = log.write(m)
                bar.update(1)
                bar.set_postfix({k: round(v, 3) for k, v in shown.items() if k in ("train_loss", "val_perplexity", "epsilon")})
                if (r + 1) % cfg.server.checkpoint_every == 0 or r + 1 == rounds:
                    self._checkpoint()
        bar.close()
        self.fanout.close()
        if stop_reason:
            tqdm.write(f"[pflm] {stop_reason}")
            self._checkpoint({"stop_reason": stop_reason})
        return self.finish(time.perf_counter() - t_start, stop_reason)

    def finish(self, wall: float, stop_reason: str | None) -> dict:
        cfg, model = self.cfg, self.server.released_model()
        artifacts.export_model(self.run_dir, model)
        test_set = load_eval_set(self.fd, "test", cfg.data.test_users)
        last_iterate = {}
        with torch_threads(self.all_threads):  # one model: all threads (device workers each had fewer)
            val = evaluate(model, self.val_set)
            test = evaluate(model, test_set)
            if self.server.ema is not None:  # released = iterate average: also publish the last iterate
                artifacts.export_model(self.run_dir, self.server.model, artifacts.LAST_ITERATE_FILE)
                last_iterate = {
                    "last_iterate_val_word_perplexity": evaluate(self.server.model, self.val_set)["word_perplexity"],
                    "last_iterate_test_word_perplexity": evaluate(self.server.model, test_set)["word_perplexity"],
                }
        priv = self.server.privacy.summary()
        # The unigram baseline uses the same public or DP prior the server holds, never the exact train counts.
        uni = unigram_baseline(self.server.prior_counts, test_set) if self.server.prior_counts is not None else None
        summary = {
            "name": cfg.name,
            "val_perplexity": val["perplexity"],
            "val_word_perplexity": val["word_perplexity"],
            "test_perplexity": test["perplexity"],
            "test_word_perplexity": test["word_perplexity"],
            **last_iterate,
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
            "secagg_parameters": self.secagg_parameters,
            "recipe": recipe_to_dict(cfg),
            **priv,
        }
        atomic_write_json(self.run_dir / "summary.json", summary)
        return summary
