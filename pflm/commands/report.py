"""`pflm report RUN_DIR|SWEEP_DIR …`: PNG curves, the privacy–utility plot of a sweep and a Markdown page that
embeds them — drawn from released values only, NOT-PRIVATE diagnostics only with --diagnostics and labelled so."""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pflm.commands.run_data import RunRecord, is_sweep_dir, load_run, load_sweep
from pflm.commands.tables import run_row, to_markdown
from pflm.errors import ConfigError, DataError
from pflm.io_utils import atomic_directory

if TYPE_CHECKING:
    from pflm.commands.plots import UtilityPoint

CURVES_PNG = "curves.png"
PRIVACY_UTILITY_PNG = "privacy_utility.png"
NOT_PRIVATE_PNG = "NOT_PRIVATE_diagnostics.png"
# Grid keys that set ε: the privacy–utility plot puts ε itself on the x axis and groups by the other keys.
EPSILON_KEYS = ("privacy.target_epsilon", "privacy.noise_multiplier")


def write_run_curves(run_dir: str | Path) -> Path:
    """RUN_DIR/curves.png (+ curves.json) from the run's released metrics: what every `pflm train` ends with."""
    from pflm.commands.plots import curves_figure, save_figure

    run = load_run(run_dir)
    fig, data = curves_figure([run])
    return save_figure(fig, data, Path(run_dir) / CURVES_PNG)


def utility_points(spec: dict, done: list[tuple[dict, RunRecord]]) -> list["UtilityPoint"]:
    from pflm.commands.plots import UtilityPoint

    out = []
    for point, run in done:
        group = ", ".join(f"{k}={v}" for k, v in point["values"].items() if k not in EPSILON_KEYS)
        wer = run.rescore.get("rescored_wer") if run.rescore else None
        first = run.rescore.get("first_pass_wer") if run.rescore else None
        ppl = run.summary.get("test_word_perplexity")
        if ppl is None:
            continue
        out.append(UtilityPoint(group, run.summary.get("epsilon") if run.private else None, float(ppl), wer, first))
    return out


def epsilon_note(done: list[tuple[dict, RunRecord]]) -> str:
    """What ε refers to, in a few words, from the first private run (δ, population, cohort)."""
    for _, run in done:
        s = run.summary
        if run.private:
            return f"δ={s.get('delta'):g}, N={s.get('privacy_population')}, cohort {s.get('noise_cohort')}"
    return ""


def write_privacy_utility(sweep_dir: Path, dest: Path | None = None) -> Path | None:
    """The sweep's privacy–utility PNG (+ JSON sidecar) at dest (default SWEEP_DIR/privacy_utility.png); None when
    no point has finished."""
    from pflm.commands.plots import privacy_utility_figure, save_figure

    spec, done = load_sweep(sweep_dir)
    points = utility_points(spec, done)
    if not points:
        return None
    title = f"privacy–utility: {spec.get('recipe_name', '')} ({done[0][1].summary.get('rounds', '?')} rounds)"
    fig, data = privacy_utility_figure(points, title, epsilon_note(done))
    return save_figure(fig, data, dest or Path(sweep_dir) / PRIVACY_UTILITY_PNG)


def build_report(dirs: list[str], out: Path, diagnostics: bool = False) -> Path:
    """Write OUT/report.md and its PNGs (atomically: the directory appears complete or not at all)."""
    from pflm.commands.plots import curves_figure, not_private_figure, privacy_utility_figure, save_figure

    sweeps, runs = [], []
    for d in dirs:
        if is_sweep_dir(d):
            sweeps.append(Path(d))
        else:
            runs.append(load_run(d, diagnostics))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [f"# pflm report ({stamp})", "",
          "Every plot and number below is DP-released or public (metrics.jsonl RELEASED keys, summary.json, rescoring "
          "of public N-best lists) unless a section says NOT PRIVATE.", ""]
    with atomic_directory(out, overwrite=True) as tmp:
        for i, sweep in enumerate(sweeps):
            spec, done = load_sweep(sweep)
            grid_keys = list(spec["grid"])
            md += [f"## Sweep {sweep}", "", f"`{spec.get('command', '')}`", ""]
            points = utility_points(spec, done)
            if points:
                name = f"sweep{i}_{PRIVACY_UTILITY_PNG}" if len(sweeps) > 1 else PRIVACY_UTILITY_PNG
                fig, data = privacy_utility_figure(points, f"privacy–utility: {spec.get('recipe_name', '')}",
                                                   epsilon_note(done))
                save_figure(fig, data, tmp / name)
                md += [f"![privacy–utility]({name})", ""]
            finished = {p["slug"]: r for p, r in done}
            rows = [run_row(finished.get(p["slug"]), p["values"], run_dir=p["run_dir"]) for p in spec["points"]]
            md += [to_markdown(rows, grid_keys), ""]
            if done:
                runs += [load_run(r.run_dir, diagnostics) for _, r in done]
            refers = next((r.summary.get("epsilon_refers_to") for _, r in done if r.private), None)
            if refers:
                md += [f"ε refers to: {refers}.", ""]
        if not runs:
            raise DataError("nothing to report: no finished run in " + ", ".join(dirs))
        fig, data = curves_figure(runs)
        save_figure(fig, data, tmp / CURVES_PNG)
        md += ["## Per-round curves (released values)", "", f"![curves]({CURVES_PNG})", "",
               to_markdown([run_row(r, {}) for r in runs], []), ""]
        if diagnostics:
            drawn = not_private_figure(runs)
            md += ["## NOT PRIVATE diagnostics", "",
                   "**NOT PRIVATE**: exact values computed from the training users without noise (diagnostics.jsonl, "
                   "or the unreleased keys of a run without DP). They are NOT covered by any ε: do not publish this "
                   "section or its figure.", ""]
            if drawn is None:
                md += ["(none of these runs has diagnostics: train with `diagnostics=true`)", ""]
            else:
                save_figure(drawn[0], drawn[1], tmp / NOT_PRIVATE_PNG)
                md += [f"![NOT PRIVATE diagnostics]({NOT_PRIVATE_PNG})", ""]
        (tmp / "report.md").write_text("\n".join(md), encoding="utf-8")
    return out / "report.md"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="PNG curves, privacy–utility plot and a Markdown summary of runs or a sweep")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="`pflm train` run dirs and/or `pflm sweep` --out dirs")
    p.add_argument("--out", help="output directory (default: RUN_DIR/report for a single dir; required for several)")
    p.add_argument("--diagnostics", action="store_true",
                   help="also plot NOT-PRIVATE diagnostics.jsonl values, in a separate figure titled NOT PRIVATE")
    p.set_defaults(func=report_cmd)


def report_cmd(args: argparse.Namespace) -> int:
    for d in args.run_dirs:
        if not Path(d).is_dir():
            raise DataError(f"{d} is not a directory; pass `pflm train` run dirs or a `pflm sweep` --out dir")
    if args.out is None and len(args.run_dirs) > 1:
        raise ConfigError("several run dirs: give --out DIR for the report")
    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "report"
    path = build_report(args.run_dirs, out, args.diagnostics)
    print(f"report: {path}")
    for png in sorted(out.glob("*.png")):
        print(f"figure: {png}{'  (NOT PRIVATE: do not publish)' if png.name == NOT_PRIVATE_PNG else ''}")
    return 0
