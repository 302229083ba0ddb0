"""`pflm audit RECIPE [k=v …]`: train a recipe with secret canaries inside and measure what leaks, beside the formal ε.

One training run (the in-process simulator) with two kinds of canaries in its population, each half inserted and
half held out (the split drawn from the audit's CSPRNG and written only to DIR/audit.json):

* sentence canaries — users whose data is one secret ASR-style phrase repeated R times: Secret Sharer exposure,
  the N-best rescoring view, and a membership test on exposure;
* canary clients — users whose update is a secret random direction at the clip bound (Andrew et al. 2024): the
  one-run ε estimate from cosines with the final model and with every round's delta, and membership tests.

The Clopper–Pearson lower bounds are statistically valid (Bonferroni over thresholds and tests); if one exceeds the
formal ε the run's privacy claim is refuted and the verdict is "fail". See docs/audit.md.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

from pflm.config import RecipeConfig, load_recipe
from pflm.errors import ConfigError, PflmError
from pflm.io_utils import atomic_write_json

AUDIT_FILE = "audit.json"
PLOT_FILE = "exposure.png"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="train a recipe with canaries; exposure, empirical ε and the formal ε (docs/audit.md)")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/chitchat_dp.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rounds=50 privacy.noise_cohort=0")
    p.add_argument("--canaries", type=int, default=20, help="sentence canaries (half inserted, half held out)")
    p.add_argument("--repeats", type=int, default=10, help="copies of its phrase each inserted canary user holds")
    p.add_argument("--users-per-canary", type=int, default=1,
                   help="users holding each inserted phrase (>1: a phrase many users say; DP then protects it only "
                        "at group level, users·ε)")
    p.add_argument("--client-canaries", type=int, default=64, help="canary clients (half inserted, half held out)")
    p.add_argument("--space", default="pin", help="canary phrase space: pin (10^4 phrases) or phone (2·10^8)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the lower bounds and intervals")
    p.add_argument("--out", default=None, help="output directory (default: <output_dir>/audit-<name>); must be new")
    p.add_argument("--compare", default=None, help="another audit's DIR: plot its exposures beside this one's")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=audit_cmd)


def audit_cmd(args: argparse.Namespace) -> int:
    cfg = load_recipe(args.recipe, args.overrides)
    out = Path(args.out) if args.out else Path(cfg.output_dir) / f"audit-{cfg.name}"
    other = load_audit(args.compare) if args.compare else None
    report = run_audit(cfg, out, args.canaries, args.repeats, args.client_canaries, args.space, args.confidence,
                       progress=not args.no_progress, users_per_canary=args.users_per_canary)
    from pflm.commands.audit_plot import plot_exposure

    plot_exposure(report, out / PLOT_FILE, other)
    for line in summary_lines(report):
        print(line)
    print(f"audit: {out / AUDIT_FILE}, plot: {out / PLOT_FILE}")
    return 0


def load_audit(path: str) -> dict:
    f = Path(path) / AUDIT_FILE
    if not f.is_file():
        raise PflmError(f"{path} has no {AUDIT_FILE}; pass the --out directory of an earlier `pflm audit`")
    return json.loads(f.read_text())


def _check_options(cfg: RecipeConfig, out: Path, canaries: int, repeats: int, clients: int, confidence: float,
                   users_per_canary: int) -> None:
    if canaries < 4 or canaries % 2 or clients < 4 or clients % 2:
        raise ConfigError("--canaries and --client-canaries must be even numbers >= 4 (half are held out)")
    if repeats < 1 or users_per_canary < 1:
        raise ConfigError("--repeats and --users-per-canary must be >= 1")
    cap = cfg.data.max_sentences_per_device
    if cap and repeats > cap:
        raise ConfigError(f"--repeats {repeats} exceeds data.max_sentences_per_device={cap} (a device trains on at most "
                          "that many sentences); lower --repeats or raise data.max_sentences_per_device")
    if not 0.5 < confidence < 1:
        raise ConfigError("--confidence must be in (0.5, 1), e.g. 0.95")
    if cfg.backend != "inprocess":
        raise ConfigError("the audit runs on the in-process simulator only; drop backend=flower")
    if (out / AUDIT_FILE).exists() or (out / "run").exists():
        raise ConfigError(f"{out} already holds an audit; pass a new --out")


def run_audit(cfg: RecipeConfig, out: Path, canaries: int, repeats: int, clients: int, space_name: str,
              confidence: float = 0.95, progress: bool = False, users_per_canary: int = 1) -> dict:
    """Train `cfg` with canaries, score them, write DIR/audit.json; returns the report."""
    from pflm.data.store import FederatedData
    from pflm.driver.run import RunDriver
    from pflm.evaluation.audit_scoring import score_canaries
    from pflm.evaluation.audit_space import check_vocabulary, get_space
    from pflm.secure_random import SecureRandom, derive_key, new_key, subkey
    from pflm.simulation.canaries import CanaryData, CanaryDevices

    _check_options(cfg, out, canaries, repeats, clients, confidence, users_per_canary)
    space = get_space(space_name)
    if not cfg.data.dir:
        raise ConfigError("recipe has no data directory; pass data.dir=DIR (a `pflm prepare` output)")
    base = FederatedData.open(cfg.data.dir)
    check_vocabulary(space, base.tokenizer)
    # The audit's own secret: canaries, their split and the client directions (seed-derived only in reproducible mode).
    key = subkey(derive_key(cfg.seed), "audit") if cfg.privacy.reproducible else new_key()
    rng = SecureRandom(key)
    phrases = space.distinct(rng, 0, canaries, "audit-canaries")
    inserted_pos = set(rng.choice(0, canaries, canaries // 2, "audit-split").tolist())
    inserted = [phrases[i] for i in range(canaries) if i in inserted_pos]
    held_out = [phrases[i] for i in range(canaries) if i not in inserted_pos]
    n_train = base.num_users("train")
    real = n_train if cfg.data.train_users == 0 else min(n_train, cfg.data.train_users)
    ids = [[base.tokenizer.word_to_id(w) for w in space.phrase(i).split()] for i in inserted]
    data = CanaryData(base, real, [[t] * repeats for t in ids for _ in range(users_per_canary)], clients // 2)
    recipe_name = cfg.name
    cfg.output_dir, cfg.name, cfg.data.train_users = str(out), "run", 0  # population = real users + canaries
    fanout = CanaryDevices(data, rng, clients)
    summary = RunDriver(cfg, fanout, data=data).run(progress=progress)
    model = fanout.driver.server.model
    sc = score_canaries(model, base.tokenizer, space, inserted + held_out, rng)
    report = build_report(cfg, summary, space, inserted, held_out, sc, fanout, repeats, confidence)
    report["run"]["recipe"] = recipe_name
    report["exposure"]["users_per_canary"] = users_per_canary
    atomic_write_json(out / AUDIT_FILE, report)
    return report


def formal_epsilon(summary: dict) -> tuple[float | None, str]:
    """The ε the canaries are entitled to: the simulated users' ε (canaries are simulated users) when the run
    used the noise-cohort setting, else the run's ε; None without noise."""
    if summary.get("noise_multiplier", 0) == 0:
        return None, "no DP noise: no formal guarantee"
    if "simulated_users_epsilon" in summary:
        e = summary["simulated_users_epsilon"]
        return (math.inf if e is None else float(e)), "simulated_users_epsilon (noise-cohort setting: the ε of the users the simulation trained)"
    e = summary.get("epsilon")
    return (math.inf if e is None else float(e)), "epsilon of the run"


def build_report(cfg, summary, space, inserted, held_out, sc, fanout, repeats, confidence) -> dict:
    from pflm.evaluation.audit_stats import epsilon_lower_bound, one_run_epsilon

    n = len(inserted)
    exp_in, exp_out = sc.exposure[:n], sc.exposure[n:]
    prom_in, prom_out = sc.promoted[:n], sc.promoted[n:]
    delta = float(summary["delta"])
    k_in = fanout.data.client_users
    cos_final = fanout.final_cosines.numpy().astype(np.float64)
    rounds = len(fanout.round_cosines)
    cos_max = (np.stack([c.numpy() for c in fanout.round_cosines]).max(0).astype(np.float64) if rounds else None)
    dim = int(fanout.directions.shape[1])
    tests = {"sentence_canaries_exposure": (np.array(exp_in), np.array(exp_out)),
             "canary_clients_final_cosine": (cos_final[:k_in], cos_final[k_in:])}
    if cos_max is not None:
        tests["canary_clients_max_round_cosine"] = (cos_max[:k_in], cos_max[k_in:])
    per_test = 1 - (1 - confidence) / len(tests)  # Bonferroni over the tests: the max below holds at `confidence`
    bounds = {k: epsilon_lower_bound(a, b, delta, per_test).__dict__ for k, (a, b) in tests.items()}
    eps_lb = max(b["epsilon_lower"] for b in bounds.values())
    one_final = one_run_epsilon(cos_final[:k_in], delta, dim=dim, confidence=confidence).__dict__
    one_all = (one_run_epsilon(cos_max[:k_in], delta, null_scores=cos_max[k_in:], confidence=confidence).__dict__
               if cos_max is not None else None)
    formal, formal_what = formal_epsilon(summary)
    if formal is None:
        verdict, why = "not private", "the run adds no noise, so there is no ε to check; the numbers show what leaks"
    elif eps_lb > formal:
        verdict, why = "fail", (f"the empirical lower bound {eps_lb:.3g} exceeds the formal ε {formal:.3g} at "
                                f"{confidence:.0%} confidence: the pipeline does not deliver its stated privacy")
    elif one_final["epsilon_low"] > formal or (one_all and one_all["epsilon_low"] > formal):
        verdict, why = "suspect", ("the one-run ε estimate's whole interval lies above the formal ε (an estimate, not a "
                                   "bound, but a sign that noise or clipping is weaker than accounted)")
    else:
        verdict, why = "pass", "no measurement contradicts the formal ε"
    ll = sc.log_likelihood
    return {
        "verdict": verdict,
        "verdict_reason": why,
        "formal": {"epsilon": None if formal is None else (formal if math.isfinite(formal) else "inf"),
                   "delta": delta, "what": formal_what, "run_epsilon": summary.get("epsilon"),
                   "noise_multiplier": summary.get("noise_multiplier"), "accountant": summary.get("accountant"),
                   "epsilon_refers_to": summary.get("epsilon_refers_to")},
        "empirical_epsilon_lower_bound": {"value": eps_lb, "confidence": confidence, "tests": bounds},
        "one_run_epsilon_final_model": one_final,
        "one_run_epsilon_all_iterates": one_all,
        "exposure": {
            "space": space.name, "template": " ".join(space.template), "space_size": space.size,
            "max_possible": space.log2_size, "method": sc.method, "repeats": repeats,
            "inserted_mean": float(np.mean(exp_in)), "inserted_max": float(np.max(exp_in)),
            "held_out_mean": float(np.mean(exp_out)), "held_out_max": float(np.max(exp_out)),
        },
        "rescoring": {"alternatives": "20 phrases of the same space differing in the secret (synthesised, LM-only)",
                      "promoted_inserted": float(np.mean(prom_in)), "promoted_held_out": float(np.mean(prom_out))},
        "canaries": {
            "sentences_inserted": [{"phrase": space.phrase(i), "exposure": e, "log_likelihood": ll[k], "promoted": p}
                                   for k, (i, e, p) in enumerate(zip(inserted, exp_in, prom_in))],
            "sentences_held_out": [{"phrase": space.phrase(i), "exposure": e, "log_likelihood": ll[n + k], "promoted": p}
                                   for k, (i, e, p) in enumerate(zip(held_out, exp_out, prom_out))],
            "clients_inserted": k_in, "clients_held_out": len(cos_final) - k_in, "release_dim": dim,
            "client_participations": fanout.participations, "rounds_observed": rounds,
            "client_final_cosine": cos_final.tolist(),
            "client_max_round_cosine": None if cos_max is None else cos_max.tolist(),
        },
        "run": {"dir": str(cfg.run_dir), "rounds": summary.get("rounds"), "population": summary.get("population"),
                "expected_cohort": summary.get("expected_cohort"), "test_word_perplexity": summary.get("test_word_perplexity"),
                "reproducible": cfg.privacy.reproducible},
        "meaning": MEANING,
    }


MEANING = {
    "verdict": "fail = a statistically valid lower bound on ε exceeds the formal ε (the privacy claim is refuted); "
               "suspect = the one-run estimate lies wholly above it; pass = nothing contradicts it",
    "formal.epsilon": "the (ε, δ) the accountant claims for the users this run trained (canaries are such users)",
    "empirical_epsilon_lower_bound.value": "with probability ≥ confidence the true ε is at least this (Clopper–Pearson "
                                           "on membership tests, Bonferroni over thresholds and tests)",
    "one_run_epsilon_final_model": "Andrew et al. 2024 estimate of ε for an adversary who sees only the final model "
                                   "(not a bound; epsilon_low/high = bootstrap interval over canaries)",
    "one_run_epsilon_all_iterates": "the same for an adversary who sees every round's model (max cosine over rounds)",
    "exposure": "Secret Sharer exposure in bits: log2|space| − log2 rank of the canary; ~1 bit when nothing is "
                "memorised, max_possible when the canary is the model's most likely phrase of its space",
    "rescoring": "fraction of canaries the LM ranks above all 20 alternatives (chance: 1/21 ≈ 0.048)",
    "exposure.users_per_canary": "users holding each inserted phrase; user-level DP covers a phrase held by U users "
                                 "only as a group (U·ε)",
    "canaries": "the secret canaries and the inserted/held-out split (operator-side: do not publish before the audit ends)",
}


def _eps(x: float) -> str:
    from pflm.evaluation.audit_stats import EPS_MAX

    return f">= {EPS_MAX:g} (search ceiling)" if x >= EPS_MAX else f"{x:.3f}"


def summary_lines(r: dict) -> list[str]:
    f, e, ex, rs = r["formal"], r["empirical_epsilon_lower_bound"], r["exposure"], r["rescoring"]
    o1, oa = r["one_run_epsilon_final_model"], r["one_run_epsilon_all_iterates"]
    lines = [
        f"verdict: {r['verdict']} — {r['verdict_reason']}",
        f"formal epsilon: {f['epsilon']} (delta {f['delta']:g}; {f['what']})",
        f"empirical epsilon lower bound: {e['value']:.3f} ({e['confidence']:.0%} confidence)",
        f"one-run epsilon estimate, final model: {_eps(o1['epsilon'])} [{_eps(o1['epsilon_low'])}, {_eps(o1['epsilon_high'])}]",
    ]
    if oa:
        lines.append(f"one-run epsilon estimate, all iterates: {_eps(oa['epsilon'])} [{_eps(oa['epsilon_low'])}, {_eps(oa['epsilon_high'])}]")
    lines += [
        f"exposure (bits, max possible {ex['max_possible']:.2f}): inserted mean {ex['inserted_mean']:.2f} max "
        f"{ex['inserted_max']:.2f}; held-out mean {ex['held_out_mean']:.2f} max {ex['held_out_max']:.2f}",
        f"rescoring promotes the canary: inserted {rs['promoted_inserted']:.0%}, held-out {rs['promoted_held_out']:.0%}",
    ]
    return lines
