"""`pflm report` and the curves every `pflm train` draws: PNGs drawn from the run's released numbers, never from
values that are not DP-released unless asked for and labelled NOT PRIVATE; TensorBoard gets released scalars only."""

from __future__ import annotations

import json
import struct
import sys

import pytest

from pflm.cli import main
from pflm.commands.plots import curves_figure, load_sidecar
from pflm.commands.run_data import load_run
from pflm.commands.train import train_recipe
from pflm.config import load_recipe
from pflm.driver.metrics import RELEASED
from pflm.errors import ConfigError
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"
# A DP run with adaptive clipping (so a noisy clipped fraction is released) and NOT-PRIVATE diagnostics on.
DP = {"privacy.target_epsilon": 4, "privacy.noise_multiplier": "null", "privacy.adaptive_clipping.enabled": "true",
      "privacy.adaptive_clipping.count_noise_std": 2, "diagnostics": "true", "server.rounds": 4}


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _rows(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x and not x.startswith("#")]


@pytest.fixture(scope="module")
def dp_run(synthetic_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cfg = load_recipe(RECIPE, tiny_overrides(synthetic_data, str(out), **DP, **{"logging.tensorboard": "true"}))
    train_recipe(cfg, progress=False)
    return cfg.run_dir


def test_train_draws_curves_from_the_released_metrics(dp_run):
    png = dp_run / "curves.png"
    w, h = _png_size(png)
    assert (w, h) == (1500, 800) and png.stat().st_size > 30_000
    rows = _rows(dp_run / "metrics.jsonl")
    side = load_sidecar(png)
    panels = {p["title"]: p for p in side["panels"]}
    eps = panels["ε spent (accountant)"]
    (line,) = eps["lines"]
    assert line["y"] == [r["epsilon"] for r in rows] and line["x"] == [r["round"] for r in rows]
    assert eps["ylim"][0] <= min(line["y"]) and max(line["y"]) <= eps["ylim"][1]
    clipped = panels["clipped fraction (noisy DP count; may leave [0, 1])"]["lines"][0]
    assert clipped["y"] == [1.0 - r["noisy_unclipped_fraction"] for r in rows]
    val = panels["validation perplexity"]["lines"][0]
    assert val["y"] == [r["val_perplexity"] for r in rows if "val_perplexity" in r]
    # the returned Figure itself has the same axis ranges as the sidecar says
    fig, data = curves_figure([load_run(dp_run)])
    ax_eps = fig.axes[1]
    assert list(ax_eps.get_ylim()) == pytest.approx(eps["ylim"]) and ax_eps.get_title() == "ε spent (accountant)"


def test_report_never_plots_unreleased_values_without_the_flag(dp_run, tmp_path, capsys):
    """The attacker here is a bug or a careless edit that puts exact training-user values in metrics.jsonl: the
    report reads only the RELEASED keys, so the planted values never reach a figure or the Markdown page."""
    diag = _rows(dp_run / "diagnostics.jsonl")
    assert diag and "train_loss" in diag[0]  # the exact values exist (NOT PRIVATE file)
    planted = tmp_path / "run"
    planted.mkdir()
    for f in ("summary.json", "diagnostics.jsonl"):
        (planted / f).write_bytes((dp_run / f).read_bytes())
    secret = 123.456789
    rows = _rows(dp_run / "metrics.jsonl")
    (planted / "metrics.jsonl").write_text("".join(json.dumps({**r, "train_loss": secret, "cohort": 7}) + "\n" for r in rows))

    assert main(["report", str(planted), "--out", str(tmp_path / "rep")]) == 0
    capsys.readouterr()
    files = sorted(p.name for p in (tmp_path / "rep").iterdir())
    assert files == ["curves.json", "curves.png", "report.md"]
    side = load_sidecar(tmp_path / "rep" / "curves.png")
    keys = {ln["key"] for p in side["panels"] for ln in p["lines"]}
    assert keys and keys <= RELEASED | {"noisy_clipped_fraction"} and side["not_private"] is False
    md = (tmp_path / "rep" / "report.md").read_text()
    assert str(secret) not in json.dumps(side) and "## NOT PRIVATE" not in md and "train_loss" not in md

    # with --diagnostics: a separate figure and section, both labelled NOT PRIVATE; the released figure is unchanged
    assert main(["report", str(planted), "--out", str(tmp_path / "rep2"), "--diagnostics"]) == 0
    assert "NOT PRIVATE: do not publish" in capsys.readouterr().out
    np_side = load_sidecar(tmp_path / "rep2" / "NOT_PRIVATE_diagnostics.png")
    assert np_side["not_private"] is True and np_side["title"].startswith("NOT PRIVATE")
    assert all(p["title"].startswith("NOT PRIVATE") for p in np_side["panels"])
    assert {ln["key"] for p in np_side["panels"] for ln in p["lines"]} >= {"train_loss", "fraction_clipped"}
    assert load_sidecar(tmp_path / "rep2" / "curves.png")["panels"] == side["panels"]
    assert "## NOT PRIVATE diagnostics" in (tmp_path / "rep2" / "report.md").read_text()


def test_tensorboard_gets_the_released_scalars_only(dp_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(dp_run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    rows = _rows(dp_run / "metrics.jsonl")
    assert tags == {f"released/{k}" for r in rows for k in r if k != "round"}
    assert {t.split("/", 1)[1] for t in tags} <= RELEASED
    eps = [(e.step, e.value) for e in acc.Scalars("released/epsilon")]
    assert eps == [(r["round"], pytest.approx(r["epsilon"], rel=1e-6)) for r in rows]


def test_missing_tensorboard_is_one_line(synthetic_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    rc = main(["train", RECIPE, *tiny_overrides(synthetic_data, str(tmp_path)), "logging.tensorboard=true"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "pip install tensorboard" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "tiny_synthetic").exists()


def test_report_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for argv, expected in [
        ([str(tmp_path / "missing")], "is not a directory"),
        ([str(tmp_path / "a")], "has no metrics.jsonl"),
        ([str(tmp_path / "a"), str(tmp_path / "b")], "give --out DIR"),
    ]:
        assert main(["report", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "a" / "report").exists()
    with pytest.raises(ConfigError, match="must be finite"):
        load_recipe(RECIPE, ["privacy.target_epsilon=.inf"])
