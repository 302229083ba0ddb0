"""`pflm train RECIPE [k=v ...]` and `pflm eval RUN_DIR`: run a recipe, evaluate a trained run."""

from __future__ import annotations

import argparse
import json
import sys

from pflm.config import RecipeConfig, load_recipe


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a recipe (resumes from the run's last checkpoint)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/chitchat_dp.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rounds=3 privacy.noise_multiplier=0 data.dir=DIR")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=train_cmd)

    e = sub.add_parser("eval", help="perplexity of a trained run on a split of a prepared data dir")
    e.add_argument("run_dir")
    e.add_argument("--data", help="prepared data dir (default: the run's data.dir)")
    e.add_argument("--split", default="test", choices=["train", "val", "test"])
    e.add_argument("--max-users", type=int, default=0)
    e.set_defaults(func=eval_cmd)


def train_recipe(cfg: RecipeConfig, progress: bool = True) -> dict:
    """Train (or resume) a recipe on its backend, then draw RUN_DIR/curves.png; returns summary.json's content."""
    if cfg.backend == "flower":
        from pflm.flower.run import run_flower

        summary = run_flower(cfg, progress=progress)
    else:
        from pflm.simulation.simulator import Simulator

        summary = Simulator(cfg).run(progress=progress)
    try:  # the run is complete either way: a failed drawing must not turn it into an error
        from pflm.commands.report import write_run_curves

        write_run_curves(cfg.run_dir)
    except Exception as e:  # noqa: BLE001
        print(f"[pflm] could not draw {cfg.run_dir}/curves.png ({type(e).__name__}: {e}); try `pflm report {cfg.run_dir}`",
              file=sys.stderr)
    return summary


def train_cmd(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    summary = train_recipe(cfg, progress=not args.no_progress)
    keys = [
        "val_perplexity", "test_perplexity", "test_word_perplexity", "unigram_test_word_perplexity",
        "rounds", "wall_seconds", "stop_reason",
    ]
    for k in keys:
        if k in summary:
            print(f"{k}: {summary[k]}")
    for line in privacy_lines(summary):
        print(line)
    if summary.get("secagg_parameters"):
        print(f"secure aggregation: {summary['secagg_parameters']}")
    print(f"run_dir: {cfg.run_dir}")
    return 0


def privacy_lines(summary: dict) -> list[str]:
    """The privacy statement of a finished run, in words: never a bare ε."""
    if summary.get("epsilon") is None and summary.get("noise_multiplier", 0) == 0:
        return ["epsilon: none (no DP noise: the model is NOT differentially private)"]
    eps = summary.get("epsilon")
    out = [
        f"epsilon: {eps if eps is not None else 'inf'} (delta {summary['delta']:g}, {summary['accountant']} accountant, "
        f"noise multiplier {summary['noise_multiplier']:.4g})",
        f"privacy: {summary['epsilon_refers_to']}",
        f"vocabulary: {summary.get('vocabulary_source')}, prior: {summary.get('prior_source')}",
    ]
    if "ensemble_epsilon" in summary:
        out.append(f"ensemble_epsilon: {summary['ensemble_epsilon']} (this run is one of {summary['ensemble_members']} "
                   "released together; publish them together only, e.g. `pflm rescore --ensemble`)")
    if "simulated_users_epsilon" in summary:
        se = summary["simulated_users_epsilon"]
        out.append(f"simulated_users_epsilon: {se if se is not None else 'inf'} ({summary['simulated_users_note']})")
    if summary.get("privacy_warning"):
        out.append(f"WARNING: {summary['privacy_warning']}")
    return out


def eval_cmd(args: argparse.Namespace) -> int:
    from pflm.data.store import FederatedData
    from pflm.evaluation.perplexity import evaluate, load_eval_set
    from pflm.evaluation.run_model import load_run_model

    model, cfg, _tok, manifest = load_run_model(args.run_dir)
    fd = FederatedData.open(args.data or cfg.data.dir)
    from pflm.data.store import same_tokenizer

    if not same_tokenizer(fd.manifest, manifest):
        from pflm.errors import PflmError

        raise PflmError(f"{args.data or cfg.data.dir} uses a different tokenizer than run {args.run_dir}; pass the run's data dir")
    res = evaluate(model, load_eval_set(fd, args.split, args.max_users))
    json.dump({"split": args.split, **res}, sys.stdout, indent=2)
    print()
    return 0
