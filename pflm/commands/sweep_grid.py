"""Sweep grids: `--grid KEY=V1,V2,…` parsed and checked, expanded to the cartesian product of run points with
stable directory names; ε = inf becomes a run without noise."""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from pflm.config import ALIASES
from pflm.errors import ConfigError

EPSILON_KEY = "privacy.target_epsilon"
INFINITE = {"inf", "+inf", "infinity", "∞"}
# Keys the sweep sets itself for every point (where its run goes, how many CPU threads it gets).
RESERVED = {"name", "output_dir"}
EXAMPLE = "e.g. --grid privacy.target_epsilon=1,2,4,8,inf"


@dataclass(frozen=True)
class Grid:
    key: str  # full dotted recipe key (aliases such as target_epsilon resolved)
    values: tuple[str, ...]  # as typed; parsed like a `k=v` override (YAML scalars)


@dataclass(frozen=True)
class SweepPoint:
    slug: str  # the run's name and directory under OUT/runs
    values: dict[str, str]  # grid key -> value of this point
    overrides: tuple[str, ...]  # `k=v` overrides that make the recipe this point


def parse_grid(spec: str) -> Grid:
    if "=" not in spec:
        raise ConfigError(f"--grid '{spec}' is not KEY=V1,V2,…; {EXAMPLE}")
    key, raw = (s.strip() for s in spec.split("=", 1))
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--grid '{spec}' has an empty key; {EXAMPLE}")
    key = ALIASES.get(key, key)
    if key in RESERVED:
        raise ConfigError(f"--grid '{spec}': the sweep sets {key} itself (each point runs in OUT/runs/<point>)")
    values = tuple(v.strip() for v in raw.split(","))
    if raw.strip() == "" or any(v == "" for v in values):
        raise ConfigError(f"--grid '{spec}' has an empty value; list values separated by commas, {EXAMPLE}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise ConfigError(f"--grid '{spec}' repeats {', '.join(repeated)}; list each value once")
    if key != EPSILON_KEY and any(v.lower() in INFINITE for v in values):
        raise ConfigError(f"--grid '{spec}': inf is only meaningful for {EPSILON_KEY} (a run without noise)")
    return Grid(key, values)


def parse_grids(specs: list[str], overrides: list[str]) -> list[Grid]:
    """The grids of one sweep; a key may appear once, and not also as a fixed `k=v` override."""
    if not specs:
        raise ConfigError(f"give at least one --grid KEY=V1,V2,…; {EXAMPLE}")
    grids = [parse_grid(s) for s in specs]
    keys = [g.key for g in grids]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(f"--grid {dup[0]} is given twice; put all its values in one --grid")
    for ov in overrides:
        k = ALIASES.get(ov.split("=", 1)[0].strip(), ov.split("=", 1)[0].strip())
        if k in RESERVED:
            raise ConfigError(f"override '{ov}': the sweep sets {k} itself; use --out DIR")
        if k in keys:
            raise ConfigError(f"override '{ov}' fixes {k}, which --grid varies; drop one of them")
    return grids


def value_overrides(key: str, value: str) -> list[str]:
    """The overrides for one grid value. ε grids calibrate σ (noise_multiplier cleared); ε = inf is a run without
    noise (no target ε, σ = 0), whose table row and plot line say 'no DP'."""
    if key == EPSILON_KEY:
        if value.lower() in INFINITE:
            return [f"{EPSILON_KEY}=null", "privacy.noise_multiplier=0"]
        return [f"{EPSILON_KEY}={value}", "privacy.noise_multiplier=null"]
    return [f"{key}={value}"]


def _slug_part(key: str, value: str, short: bool) -> str:
    name = key.rsplit(".", 1)[-1] if short else key
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{name}={value}")


def expand(grids: list[Grid]) -> list[SweepPoint]:
    """Every combination of the grids' values, in grid order (the first grid varies slowest)."""
    last = [g.key.rsplit(".", 1)[-1] for g in grids]
    short = {g.key: last.count(g.key.rsplit(".", 1)[-1]) == 1 for g in grids}
    points, seen = [], {}
    for combo in itertools.product(*(g.values for g in grids)):
        values = {g.key: v for g, v in zip(grids, combo)}
        slug = "__".join(_slug_part(k, v, short[k]) for k, v in values.items())
        if slug in seen:
            raise ConfigError(f"grid points {seen[slug]} and {values} would share the run directory {slug}; "
                              "use values that differ in letters, digits, '.', '+' or '-'")
        seen[slug] = values
        overrides = [o for k, v in values.items() for o in value_overrides(k, v)]
        points.append(SweepPoint(slug, values, tuple(overrides)))
    return points
