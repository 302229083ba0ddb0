"""`pflm sweep` grids: cartesian expansion, ε = inf as a run without noise, and one-line errors that write nothing."""

from __future__ import annotations

import pytest

from pflm.cli import main
from pflm.commands.sweep_grid import expand, parse_grids, value_overrides
from pflm.config import load_recipe
from pflm.errors import ConfigError

RECIPE = "recipes/tiny_synthetic.yaml"


def test_expand_is_the_cartesian_product_in_grid_order():
    grids = parse_grids(["target_epsilon=1,2,inf", "privacy.clip_bound=0.1,1"], [])
    pts = expand(grids)
    assert [p.values for p in pts] == [
        {"privacy.target_epsilon": e, "privacy.clip_bound": c} for e in ("1", "2", "inf") for c in ("0.1", "1")
    ]
    assert len({p.slug for p in pts}) == 6 and pts[0].slug == "target_epsilon=1__clip_bound=0.1"
    # the same last component in two keys: full keys keep the directories apart
    pts = expand(parse_grids(["privacy.noise_multiplier=1", "dpsgd.noise_multiplier=1,2"], []))
    assert pts[1].slug == "privacy.noise_multiplier=1__dpsgd.noise_multiplier=2"


def test_inf_is_a_run_without_noise_and_finite_eps_calibrates_sigma():
    base = ["data.dir=/nonexistent", "privacy.noise_multiplier=0.7"]  # a recipe with a fixed σ
    inf = load_recipe(RECIPE, base + value_overrides("privacy.target_epsilon", "inf"))
    assert not inf.private and inf.privacy.target_epsilon is None and inf.privacy.noise_multiplier == 0
    two = load_recipe(RECIPE, base + value_overrides("privacy.target_epsilon", "2"))
    assert two.private and two.privacy.target_epsilon == 2.0 and two.privacy.noise_multiplier is None
    # `pflm train` itself refuses an infinite target with the fix, instead of failing at calibration
    with pytest.raises(ConfigError, match="privacy.noise_multiplier=0"):
        load_recipe(RECIPE, ["privacy.target_epsilon=inf"])


@pytest.mark.parametrize(
    "grid, expected",
    [
        ("privacy.target_epsilo=1,2", "did you mean 'target_epsilon'"),
        ("privacy.clip_bound=", "empty value"),
        ("privacy.clip_bound=1,,2", "empty value"),
        ("privacy.clip_bound=abc,1", "privacy.clip_bound: expected a number"),
        ("privacy.clip_bound=-1", "privacy.clip_bound must be > 0"),
        ("privacy.clip_bound", "is not KEY=V1,V2"),
        ("=1,2", "empty key"),
        ("privacy.clip_bound=1,1", "repeats 1"),
        ("privacy.clip_bound=1,inf", "inf is only meaningful"),
        ("name=a,b", "the sweep sets name itself"),
    ],
)
def test_bad_grids_give_one_line_and_write_nothing(grid, expected, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["sweep", RECIPE, "--grid", grid, "--out", str(out), f"data.dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert expected in err and len(err.splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--grid", "rounds=1,2", "--grid", "server.rounds=3"], "given twice"),
        (["--grid", "privacy.clip_bound=1,2", "clip_bound=3"], "which --grid varies"),
        (["--grid", "privacy.clip_bound=1", "output_dir=x"], "the sweep sets output_dir"),
        ([], "at least one --grid"),
        (["--grid", "rounds=1", "--jobs", "0"], "--jobs 0 must be >= 1"),
        (["--grid", "rounds=1", "--nbest-dev", "d.jsonl"], "both --nbest-dev and --nbest-test"),
        (["--grid", "rounds=1,2", "data.dir=/nonexistent"], "is not a `pflm prepare` output"),
    ],
)
def test_bad_sweep_options(argv, expected, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc = main(["sweep", RECIPE, "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and expected in err and len(err.splitlines()) == 1, err
    assert not out.exists()
