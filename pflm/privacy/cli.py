"""`pflm privacy epsilon|calibrate|plan`: answer "which σ, cohort and rounds give ε ≤ target?" before training."""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, NoReturn

from pflm.errors import ConfigError
from pflm.io_utils import atomic_write_bytes, atomic_write_text
from pflm.privacy.accountant import ACCOUNTANTS, SAMPLINGS, PrivacyBudget, calibrate_noise, compute_epsilon
from pflm.privacy.dpftrl import cli as dpftrl_cli


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make argparse usage errors one line (exit 2), like the PflmError errors printed by pflm/cli.py."""

    def error(message: str) -> NoReturn:
        print(f"{parser.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]


def _population_args(p: argparse.ArgumentParser, with_rate: bool) -> None:
    if with_rate:
        p.add_argument("--sampling-rate", type=float, help="q per round (instead of --cohort/--population)")
    p.add_argument("--cohort", type=int, help="(noise) cohort size per round: the cohort ε refers to")
    p.add_argument("--population", type=int, help="number of users N the cohort is drawn from")
    p.add_argument("--rounds", type=int, required=True, help="number of releases (training rounds)")
    p.add_argument("--delta", type=float, required=True, help="δ (typically < 1/population)")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp", help="Opacus rdp|prv, or pld (dp-accounting)")
    p.add_argument("--sampling", choices=SAMPLINGS, default="poisson", help="how cohorts are drawn (default poisson)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of key: value lines")
    dpftrl_cli.add_args(p)


def _solve(args: argparse.Namespace, sigma: float | None = None, epsilon: float | None = None) -> dict[str, Any]:
    """ε for σ, or σ for a target ε, from --cohort/--population (a PrivacyBudget) or --sampling-rate."""
    if args.mechanism == "dpftrl":
        return dpftrl_cli.solve(args, sigma, epsilon)
    rate = getattr(args, "sampling_rate", None)
    if rate is None:
        if args.cohort is None or args.population is None:
            raise ConfigError("give --cohort and --population (or --sampling-rate)")
        return PrivacyBudget(population=args.population, cohort=args.cohort, rounds=args.rounds, delta=args.delta,
                             noise_multiplier=sigma, epsilon=epsilon, accountant=args.accountant,
                             sampling=args.sampling).to_dict()
    if args.cohort is not None or args.population is not None:
        raise ConfigError("give either --sampling-rate or --cohort and --population, not both")
    if not 0 < rate <= 1:
        raise ConfigError(f"--sampling-rate {rate:g} is invalid: use 0 < q ≤ 1")
    if args.rounds < 1:
        raise ConfigError(f"--rounds {args.rounds} is invalid: use at least 1 round")
    if not 0 < args.delta < 1:
        raise ConfigError(f"--delta {args.delta:g} is invalid: use 0 < δ < 1")
    target = None
    if epsilon is not None:
        target = epsilon
        sigma = calibrate_noise(rate, args.rounds, args.delta, epsilon, args.accountant)
    assert sigma is not None
    eps = compute_epsilon(rate, sigma, args.rounds, args.delta, args.accountant)
    how = "Poisson sampling" if args.sampling == "poisson" else "fixed-size cohorts accounted as Poisson sampling"
    return {
        "epsilon": None if math.isinf(eps) else eps, "target_epsilon": target, "delta": args.delta,
        "noise_multiplier": sigma, "population": None, "noise_cohort": None, "sampling_rate": rate,
        "rounds": args.rounds, "accountant": args.accountant, "sampling": args.sampling,
        "sampling_statement": f"{how} with q={rate:g} (as given)",
    }


def _report(d: dict[str, Any], first: str, args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps(d, sort_keys=True))
        return
    order = [first] + [k for k in ("noise_multiplier", "epsilon", "target_epsilon", "delta", "sampling_rate",
                                   "noise_cohort", "population", "rounds", "accountant") if k != first]
    for k in order:
        v = d[k]
        if k == "epsilon" and v is None:
            v = "inf (no noise)"
        if v is not None:
            print(f"{k}: {v!r}" if isinstance(v, float) else f"{k}: {v}")
    print(f"sampling: {d['sampling_statement']}")


def run_epsilon(args: argparse.Namespace) -> int:
    if args.noise_multiplier < 0:
        raise ConfigError(f"--noise-multiplier {args.noise_multiplier:g} is negative: use σ ≥ 0")
    _report(_solve(args, sigma=args.noise_multiplier), "epsilon", args)
    return 0


def _distributed(args: argparse.Namespace, cohort: int, rounds: int, bits: int) -> dict[str, Any]:
    from pflm.privacy.distributed.report import distributed_row

    if args.dim is None or args.dim < 1:
        raise ConfigError(f"--mechanism {args.mechanism} needs --dim (the length of the release vector, ≥ 1)")
    if args.population is None or cohort is None:
        raise ConfigError(f"--mechanism {args.mechanism} needs --cohort and --population")
    if args.accountant != "rdp" or args.sampling != "poisson":
        raise ConfigError(f"--mechanism {args.mechanism} is accounted with RDP under Poisson sampling: "
                          "use --accountant rdp --sampling poisson")
    if not 0 <= args.dropout_tolerance < 1:
        raise ConfigError(f"--dropout-tolerance {args.dropout_tolerance:g} must be a fraction in [0, 1)")
    return distributed_row(args.mechanism, bits, cohort, args.population, rounds, args.delta, args.epsilon,
                           args.clip_bound, args.dim, args.dropout_tolerance)


def run_calibrate(args: argparse.Namespace) -> int:
    if not args.epsilon > 0:
        raise ConfigError(f"--epsilon {args.epsilon:g} is invalid: use a target ε > 0")
    if args.mechanism.startswith("distributed_"):
        from pflm.privacy.distributed.report import describe

        row = _distributed(args, args.cohort, args.rounds, args.bits)
        if args.json:
            print(json.dumps(row, sort_keys=True))
        else:
            print(f"noise_multiplier: {row['noise_multiplier']!r}")
            print("\n".join(describe(row)))
        return 0
    _report(_solve(args, epsilon=args.epsilon), "noise_multiplier", args)
    return 0


def _plot(path: Path, curves: list[tuple[str, float, float]], max_rounds: int, delta: float, target: float,
          accountant: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = sorted({max(1, round(max_rounds * (i / 24) ** 1.5)) for i in range(1, 25)} | {1, max_rounds})
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, q, sigma in curves:
        ax.plot(ts, [compute_epsilon(q, sigma, t, delta, accountant) for t in ts], label=label)
    ax.axhline(target, color="k", linestyle="--", linewidth=1, label=f"target ε={target:g}")
    ax.set_xlabel("rounds")
    ax.set_ylabel(f"ε (δ={delta:g}, {accountant})")
    ax.set_title("ε vs rounds at the σ calibrated for the largest round count")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def run_plan(args: argparse.Namespace) -> int:
    if not args.clip_bound > 0 or math.isinf(args.clip_bound):
        raise ConfigError(f"--clip-bound {args.clip_bound:g} is invalid: use a finite C > 0")
    if args.dim < 1:
        raise ConfigError(f"--dim {args.dim} is invalid: give the length of the release vector (≥ 1)")
    rows: list[dict[str, Any]] = []
    curves: list[tuple[str, float, float]] = []
    if args.mechanism.startswith("distributed_"):
        return _plan_distributed(args)
    for cohort in args.cohorts:
        for rounds in sorted(args.rounds):
            if args.mechanism == "dpftrl":
                rows.append(dpftrl_cli.plan_row(args, cohort, rounds))
                continue
            b = PrivacyBudget(population=args.population, cohort=cohort, rounds=rounds, delta=args.delta,
                              epsilon=args.epsilon, accountant=args.accountant, sampling=args.sampling)
            sigma = float(b.noise_multiplier or 0.0)
            std_mean = sigma * args.clip_bound / cohort
            noise_norm = std_mean * math.sqrt(args.dim)
            rows.append({
                "cohort": cohort, "rounds": rounds, "sampling_rate": b.sampling_rate, "noise_multiplier": sigma,
                "epsilon": b.epsilon, "noise_std_mean": std_mean, "noise_norm_mean": noise_norm,
                # signal: the mean of clipped updates has norm ≤ C (= C when all updates agree and are clipped)
                "snr_upper_bound": args.clip_bound / noise_norm if noise_norm > 0 else math.inf,
            })
        if args.mechanism == "dpftrl":
            continue
        curves.append((f"cohort {cohort} (q={cohort / args.population:g}), σ={rows[-1]['noise_multiplier']:.3f}",
                       cohort / args.population, rows[-1]["noise_multiplier"]))
    out = Path(args.out)
    _write_csv(out / "plan.csv", rows)
    _plot(out / "plan.png", curves, max(args.rounds), args.delta, args.epsilon, args.accountant)
    if args.mechanism == "dpftrl":
        return _report_dpftrl_plan(rows, out, args)
    statement = (
        f"Poisson sampling with q=cohort/population per row (what the {args.accountant} accountant analyses)"
        if args.sampling == "poisson"
        else "fixed-size cohorts accounted as Poisson sampling with q=cohort/population (standard approximation)"
    )
    if args.json:
        print(json.dumps({"rows": rows, "sampling_statement": statement, "csv": str(out / "plan.csv"),
                          "png": str(out / "plan.png")}))
        return 0
    print(f"target ε={args.epsilon:g} δ={args.delta:g} population={args.population} C={args.clip_bound:g} "
          f"d={args.dim} accountant={args.accountant}")
    print(f"{'cohort':>8} {'rounds':>7} {'sigma':>8} {'epsilon':>8} {'std(avg)':>10} {'|noise|':>10} {'SNR<=':>8}")
    for r in rows:
        print(f"{r['cohort']:>8} {r['rounds']:>7} {r['noise_multiplier']:>8.4f} {r['epsilon']:>8.4f} "
              f"{r['noise_std_mean']:>10.3e} {r['noise_norm_mean']:>10.3e} {r['snr_upper_bound']:>8.3g}")
    print("std(avg) = σ·C/cohort per coordinate; |noise| = σ·C·√d/cohort; "
          "SNR<= = C/|noise| (mean clipped update ≤ C)")
    print(f"sampling: {statement}")
    print(f"wrote {out / 'plan.csv'} and {out / 'plan.png'}")
    return 0


def _report_dpftrl_plan(rows: list[dict[str, Any]], out: Path, args: argparse.Namespace) -> int:
    """The DP-FTRL plan: plan.csv (no ε-vs-rounds plot: ε is one release for the whole run)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "plan.csv", buf.getvalue())
    statement = (f"DP-FTRL {args.kind}: no sampling amplification; each user in ≤ k rounds ≥ b apart "
                 "(b = --min-separation or population // cohort)")
    if args.json:
        print(json.dumps({"rows": rows, "sampling_statement": statement, "csv": str(out / "plan.csv")}))
        return 0
    print(f"target ε={args.epsilon:g} δ={args.delta:g} population={args.population} C={args.clip_bound:g} "
          f"d={args.dim} accountant={args.accountant} mechanism=dpftrl/{args.kind}")
    print(f"{'cohort':>8} {'rounds':>7} {'b':>6} {'k':>4} {'sens':>8} {'sigma':>8} {'std(avg)':>10} {'std(sum)':>10}")
    for r in rows:
        print(f"{r['cohort']:>8} {r['rounds']:>7} {r['min_separation']:>6} {r['max_participations']:>4} "
              f"{r['sensitivity']:>8.4f} {r['noise_multiplier']:>8.4f} {r['noise_std_mean']:>10.3e} "
              f"{r['prefix_noise_std_mean']:>10.3e}")
    print("std(avg) = σ·C/cohort on z; std(sum) = noise std per coordinate of the worst prefix sum of averages")
    print(f"sampling: {statement}")
    print(f"wrote {out / 'plan.csv'}")
    return 0


def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _plan_distributed(args: argparse.Namespace) -> int:
    """Distributed-DP plan: per cohort × rounds × bits, the noise gap to central DP and the wrap-around risk."""
    rows = [_distributed(args, c, r, b) for c in args.cohorts for r in sorted(args.rounds) for b in args.bits]
    out = Path(args.out)
    _write_csv(out / "plan.csv", rows)
    if args.json:
        print(json.dumps({"rows": rows, "csv": str(out / "plan.csv")}))
        return 0
    print(f"target ε={args.epsilon:g} δ={args.delta:g} population={args.population} C={args.clip_bound:g} "
          f"d={args.dim} mechanism={args.mechanism} dropout tolerance={args.dropout_tolerance:g}")
    print(f"{'cohort':>7} {'rounds':>6} {'bits':>4} {'z':>7} {'central':>7} {'gap':>7} {'inflation':>9} "
          f"{'wrap/coord':>10} {'payload B':>11}")
    for r in rows:
        print(f"{r['cohort']:>7} {r['rounds']:>6} {r['bits']:>4} {r['noise_multiplier']:>7.4f} "
              f"{r['central_noise_multiplier']:>7.4f} {r['noise_gap']:>7.3f} {r['rounding_inflation'] - 1:>9.2e} "
              f"{r['wrap_prob_per_coord']:>10.2e} {r['payload_bytes']:>11,}")
    print("z = √(noise variance of the tolerated survivors)/Δ₂; gap = std of the sum's noise + rounding error with "
          "every device's share / central σ·C; wrap/coord: sub-Gaussian bound (utility only)")
    print(f"wrote {out / 'plan.csv'}")
    return 0


def _distributed_args(p: argparse.ArgumentParser, plan: bool) -> None:
    """Distributed-DP options; extends the --mechanism choices (defined with the DP-FTRL options)."""
    for a in p._actions:
        if a.dest == "mechanism" and a.choices is not None:
            a.choices = (*a.choices, "distributed_skellam", "distributed_dgauss")
    g = p.add_argument_group("distributed DP (--mechanism distributed_skellam|distributed_dgauss)")
    if plan:
        g.add_argument("--bits", type=int, nargs="+", default=[16, 18, 20], help="bits per coordinate")
    else:
        g.add_argument("--bits", type=int, default=18, help="bits per coordinate")
        g.add_argument("--dim", type=int, help="length d of the release vector")
        g.add_argument("--clip-bound", type=float, default=1.0, help="L2 clip bound C")
    g.add_argument("--dropout-tolerance", type=float, default=0.05, help="fraction of devices that may drop")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("privacy", help="privacy budget tools: epsilon, calibrate, plan")
    _one_line_errors(p)
    sub = p.add_subparsers(dest="privacy_command", metavar="{epsilon,calibrate,plan}")
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])

    def quiet(fn):  # keep output to the documented lines: Opacus' order-grid warnings go to the docs instead
        def run(args: argparse.Namespace) -> int:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
                return fn(args)

        return run

    e = sub.add_parser("epsilon", help="ε for a noise multiplier, sampling rate and number of rounds")
    e.add_argument("--noise-multiplier", type=float, required=True, help="σ (noise std / clip bound)")
    _population_args(e, with_rate=True)
    e.set_defaults(func=quiet(run_epsilon))

    c = sub.add_parser("calibrate", help="smallest σ giving ε ≤ target (prints 'noise_multiplier: <value>')")
    c.add_argument("--epsilon", type=float, required=True, help="target ε")
    _population_args(c, with_rate=True)
    _distributed_args(c, plan=False)
    c.set_defaults(func=quiet(run_calibrate))

    pl = sub.add_parser("plan", help="grid of cohorts × rounds for a target ε: σ, noise on the average, SNR")
    pl.add_argument("--epsilon", type=float, required=True, help="target ε")
    pl.add_argument("--delta", type=float, required=True, help="δ (typically < 1/population)")
    pl.add_argument("--population", type=int, required=True, help="number of users N")
    pl.add_argument("--cohorts", type=int, nargs="+", required=True, help="(noise) cohort sizes to try")
    pl.add_argument("--rounds", type=int, nargs="+", required=True, help="round counts to try")
    pl.add_argument("--clip-bound", type=float, default=1.0, help="L2 clip bound C (default 1.0)")
    pl.add_argument("--dim", type=int, required=True, help="length d of the release vector (parameters sent)")
    pl.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp")
    pl.add_argument("--sampling", choices=SAMPLINGS, default="poisson")
    pl.add_argument("--out", default="privacy_plan", help="directory for plan.csv and plan.png")
    pl.add_argument("--json", action="store_true")
    dpftrl_cli.add_args(pl)
    _distributed_args(pl, plan=True)
    pl.set_defaults(func=quiet(run_plan))
    for parser in (e, c, pl):
        _one_line_errors(parser)
