"""`pflm sweep RECIPE --grid KEY=V1,V2 … --out DIR`: one `pflm train` run per grid point, several at once on
split CPU threads, resumable, then a results table (CSV + Markdown) and the privacy–utility plot."""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from pflm.commands.sweep_grid import SweepPoint, expand, parse_grids
from pflm.config import ALIASES, RecipeConfig, load_recipe, recipe_to_dict
from pflm.driver.recipe_check import recipe_changes
from pflm.errors import ConfigError, DataError, PflmError
from pflm.evaluation.run_model import RECIPE_FILE
from pflm.io_utils import atomic_write_json, atomic_write_text
from pflm.runtime import available_cpus

RUNS_DIR = "runs"
# Recipe keys that say where and how fast a run goes, not what it releases: a finished run whose recipe differs
# from the point's only in these is done (the sweep itself sets threads from --jobs).
RUNTIME_KEYS = ("threads", "device_workers", "output_dir", "backend", "flower", "data.dir", "aggregation.secagg.threads")


@dataclass(frozen=True)
class PointTask:
    """What a worker does for one point: train (resuming) unless finished, then rescore if N-best sets are given."""

    recipe: str
    overrides: tuple[str, ...]
    slug: str
    train: bool
    nbest: tuple[str, str] | None


def _strip_runtime(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        full = f"{prefix}{k}"
        if full in RUNTIME_KEYS:
            continue
        out[k] = _strip_runtime(v, f"{full}.") if isinstance(v, dict) else v
    return out


def finished(cfg: RecipeConfig) -> bool:
    """The run dir holds a summary.json written by a run of this very recipe (runtime keys aside). An interrupted
    run has no summary (or an older one with fewer rounds): `pflm train` resumes it from its last checkpoint."""
    import json

    path = cfg.run_dir / "summary.json"
    if not path.is_file():
        return False
    recipe = json.loads(path.read_text()).get("recipe", {})
    return _strip_runtime(recipe) == _strip_runtime(recipe_to_dict(cfg))


def rescore_needed(run_dir: Path, nbest: tuple[str, str] | None) -> bool:
    import json

    if nbest is None:
        return False
    summ, model = run_dir / "rescore" / "summary.json", run_dir / "model.safetensors"
    if not summ.is_file() or not model.is_file() or summ.stat().st_mtime < model.stat().st_mtime:
        return True
    old = json.loads(summ.read_text())
    return (old.get("dev"), old.get("test")) != (str(nbest[0]), str(nbest[1]))


def _init_worker(threads: int) -> None:
    """Each pool worker: `threads` threads for torch and the BLAS/OpenMP pools, set before torch is imported."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


def run_point(task: PointTask) -> dict:
    """Train/resume one point and rescore it; never raises for a point's own failure (the sweep goes on)."""
    t0 = time.perf_counter()
    try:
        cfg = load_recipe(task.recipe, list(task.overrides))
        if task.train:
            from pflm.commands.train import train_recipe

            train_recipe(cfg, progress=False)
        if task.nbest is not None and rescore_needed(cfg.run_dir, task.nbest):
            from pflm.evaluation.rescore import RescoreConfig
            from pflm.evaluation.rescore_cli import rescore_run

            rescore_run(cfg.run_dir, task.nbest[0], task.nbest[1], RescoreConfig(), cfg.run_dir / "rescore")
    except PflmError as e:
        return {"slug": task.slug, "status": f"failed: {e}", "seconds": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - a bug in one point must not lose the others; the traceback is shown
        traceback.print_exc()
        return {"slug": task.slug, "status": f"failed: {type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
    return {"slug": task.slug, "status": "done", "seconds": time.perf_counter() - t0}


def _thread_share(jobs: int, total: int, overrides: list[str], grid_keys: list[str]) -> int | None:
    """CPU threads per run (None when the user fixed `threads` and the sweep keeps it)."""
    fixed = "threads" in grid_keys or any(ALIASES.get(o.split("=", 1)[0], o.split("=", 1)[0]) == "threads"
                                           for o in overrides)
    if fixed:
        return None
    return max(1, total // jobs)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="train a recipe at every point of a grid (resumable); table + privacy–utility plot")
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/chitchat_dp.yaml")
    p.add_argument("overrides", nargs="*", help="overrides for every point, e.g. rounds=50 data.dir=DIR")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,…",
                   help="a recipe key and its values (repeat for a cartesian product); privacy.target_epsilon "
                        "accepts inf for a run without noise, e.g. --grid privacy.target_epsilon=1,2,4,8,inf")
    p.add_argument("--out", required=True, help="sweep directory: runs/<point>/, results.csv/.md, privacy_utility.png")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, each in its own process (default 1)")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for the whole sweep, split evenly between the --jobs runs (default: all CPUs)")
    p.add_argument("--nbest-dev", help="dev N-best JSONL: with --nbest-test, rescore every point (WER column)")
    p.add_argument("--nbest-test", help="test N-best JSONL (read only after tuning on dev)")
    p.add_argument("--dry-run", action="store_true", help="list the points and which are finished; train nothing")
    p.set_defaults(func=sweep_cmd)


def _nbest(args: argparse.Namespace) -> tuple[str, str] | None:
    if bool(args.nbest_dev) != bool(args.nbest_test):
        raise ConfigError("give both --nbest-dev and --nbest-test (WER needs a dev set to tune on), or neither")
    if not args.nbest_dev:
        return None
    for f in (args.nbest_dev, args.nbest_test):
        if not Path(f).is_file():
            raise DataError(f"N-best file {f} not found; make it with `pflm nbest` (see README)")
    return (str(Path(args.nbest_dev).resolve()), str(Path(args.nbest_test).resolve()))


def sweep_cmd(args: argparse.Namespace) -> int:
    if args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs} must be >= 1")
    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads} must be >= 0 (0 = all CPUs)")
    nbest = _nbest(args)
    grids = parse_grids(args.grid, args.overrides)
    points = expand(grids)
    out = Path(args.out).resolve()
    base = load_recipe(args.recipe, args.overrides)  # errors in the base recipe name no grid point
    cfgs: dict[str, RecipeConfig] = {}
    for pt in points:
        cfgs[pt.slug] = _point_recipe(args, pt, out, threads=None)
    for c in {c.data.dir for c in cfgs.values()}:
        if not c or not (Path(c) / "manifest.json").is_file():
            raise DataError(f"data.dir={c or '(none)'} is not a `pflm prepare` output directory; pass data.dir=DIR")
    for pt in points:  # a point's existing run must continue under the same recipe (pflm train's resume rule)
        try:
            recipe_changes(cfgs[pt.slug].run_dir, cfgs[pt.slug], RECIPE_FILE)
        except PflmError as e:
            raise PflmError(f"grid point {pt.slug}: {e}; or sweep into a new --out DIR") from None
    pending = [pt for pt in points if not finished(cfgs[pt.slug])]
    todo = [pt for pt in points if pt in pending or rescore_needed(cfgs[pt.slug].run_dir, nbest)]
    jobs = max(1, min(args.jobs, len(todo)))
    total = args.threads or available_cpus()
    share = _thread_share(jobs, total, args.overrides, [g.key for g in grids])
    if share is not None:
        cfgs = {pt.slug: _point_recipe(args, pt, out, share) for pt in points}
    elif jobs * (cfgs[points[0].slug].threads or available_cpus()) > total:
        print(f"[pflm sweep] warning: {jobs} runs × threads={cfgs[points[0].slug].threads} exceed {total} CPU "
              "threads; they will slow each other down", file=sys.stderr)
    for pt in points:
        state = "pending" if pt in pending else "finished"
        print(f"{pt.slug}: {state} → {cfgs[pt.slug].run_dir}")
    if args.dry_run:
        return 0
    _write_spec(args, out, base, grids, points)
    tasks = [PointTask(args.recipe, _overrides(args, pt, out, share), pt.slug, pt in pending, nbest) for pt in todo]
    print(f"[pflm sweep] {len(points)} points, {len(points) - len(pending)} finished, {len(tasks)} to run; "
          f"{jobs} at once" + (f", {share} threads each" if share else ""))
    results = _run_tasks(tasks, jobs, share or 1)
    failed = {slug: r["status"] for slug, r in results.items() if r["status"] != "done"}
    table = write_results(out, failed)
    print(f"results: {table} and {table.with_suffix('.csv')}")
    from pflm.commands.report import write_privacy_utility

    png = write_privacy_utility(out)
    if png:
        print(f"privacy–utility plot: {png}")
    if failed:
        print(f"[pflm sweep] {len(failed)} point(s) failed; rerun the same command to retry them (finished points "
              "are skipped, interrupted ones resume)", file=sys.stderr)
        return 1
    return 0


def _overrides(args: argparse.Namespace, pt: SweepPoint, out: Path, threads: int | None) -> tuple[str, ...]:
    extra = [f"output_dir={out / RUNS_DIR}", f"name={pt.slug}"] + ([f"threads={threads}"] if threads else [])
    return (*args.overrides, *pt.overrides, *extra)


def _point_recipe(args: argparse.Namespace, pt: SweepPoint, out: Path, threads: int | None) -> RecipeConfig:
    try:
        return load_recipe(args.recipe, list(_overrides(args, pt, out, threads)))
    except ConfigError as e:
        where = ", ".join(f"{k}={v}" for k, v in pt.values.items())
        raise ConfigError(f"grid point {where}: {e}") from None


def _write_spec(args: argparse.Namespace, out: Path, base: RecipeConfig, grids: list, points: list[SweepPoint]) -> None:
    cmd = ["pflm", "sweep", args.recipe, *args.overrides, *[f"--grid={g}" for g in args.grid], "--out", args.out]
    atomic_write_json(out / "sweep.json", {
        "command": shlex.join(cmd),
        "recipe": args.recipe,
        "recipe_name": base.name,
        "overrides": list(args.overrides),
        "grid": {g.key: list(g.values) for g in grids},
        "points": [{"slug": p.slug, "values": p.values, "run_dir": f"{RUNS_DIR}/{p.slug}"} for p in points],
        "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })


def _run_tasks(tasks: list[PointTask], jobs: int, threads: int) -> dict[str, dict]:
    results: dict[str, dict] = {}

    def report(r: dict) -> None:
        results[r["slug"]] = r
        print(f"[{len(results)}/{len(tasks)}] {r['slug']}: {r['status']} ({r['seconds']:.0f} s)", flush=True)

    if jobs == 1:
        for t in tasks:
            report(run_point(t))
        return results
    import multiprocessing

    # spawn: each worker imports torch fresh with its own thread settings (fork after torch threads is unsafe)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = [pool.submit(run_point, t) for t in tasks]
        try:
            for f in as_completed(futures):
                report(f.result())
        except BrokenProcessPool:
            raise PflmError("a sweep worker process died (killed, or out of memory?); rerun the same command: "
                            "finished points are skipped and interrupted ones resume (try fewer --jobs)") from None
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return results


def write_results(out: Path, failed: dict[str, str]) -> Path:
    """OUT/results.csv and OUT/results.md (one row per point, in grid order, with the privacy–utility PNG)."""
    from pflm.commands.report import PRIVACY_UTILITY_PNG
    from pflm.commands.run_data import load_sweep
    from pflm.commands.tables import run_row, to_csv, to_markdown

    spec, done = load_sweep(out)
    runs = {p["slug"]: r for p, r in done}
    rows = [run_row(runs.get(p["slug"]), p["values"], failed.get(p["slug"], ""), p["run_dir"]) for p in spec["points"]]
    grid_keys = list(spec["grid"])
    atomic_write_text(out / "results.csv", to_csv(rows, grid_keys))
    refers = next((r.summary.get("epsilon_refers_to") for _, r in done if r.private), None)
    md = [f"# Sweep results ({spec['updated']})", "", f"`{spec['command']}`", "", to_markdown(rows, grid_keys)]
    if refers:
        md += [f"ε (δ in the table) refers to: {refers}. ∞ = trained without noise (not private).", ""]
    md += [f"![privacy–utility]({PRIVACY_UTILITY_PNG})", ""]
    atomic_write_text(out / "results.md", "\n".join(md))
    return out / "results.md"
