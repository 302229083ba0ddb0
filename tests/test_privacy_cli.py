"""`pflm privacy epsilon|calibrate|plan`: the calibrate output contract, JSON, plan files, one-line errors."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys

import pytest

from pflm import cli
from pflm.privacy.accountant import calibrate_noise, compute_epsilon


@pytest.fixture(autouse=True)
def _only_privacy(monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ["pflm.privacy.cli"])


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        rc = cli.main(["privacy", *argv])
    except SystemExit as e:  # argparse usage errors
        rc = int(e.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


SO = ["--delta", "1e-6", "--population", "1000000", "--cohort", "5000", "--rounds", "2000"]


def test_calibrate_contract_subprocess():
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "pflm", "privacy", "calibrate", "--epsilon", "2", *SO],
                       capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    m = re.fullmatch(r"noise_multiplier: (\S+)", lines[0])
    assert m, p.stdout
    sigma = float(m.group(1))
    assert sigma == calibrate_noise(0.005, 2000, 1e-6, 2.0, "rdp")
    assert compute_epsilon(0.005, sigma, 2000, 1e-6, "rdp") <= 2.0
    text = p.stdout
    assert "epsilon: " in text and "sampling_rate: 0.005" in text and "accountant: rdp" in text
    assert "sampling: Poisson" in text


def test_calibrate_json_and_fixed_sampling(capsys):
    rc, out, _ = _run(capsys, "calibrate", "--epsilon", "2", *SO, "--json", "--sampling", "fixed")
    assert rc == 0
    d = json.loads(out)
    assert d["epsilon"] <= 2.0 and d["noise_cohort"] == 5000 and d["sampling"] == "fixed"
    assert "approximation" in d["sampling_statement"]


def test_epsilon_with_rate_or_cohort(capsys):
    rc, out, _ = _run(capsys, "epsilon", "--noise-multiplier", "0.864", "--sampling-rate", "0.005",
                      "--rounds", "2000", "--delta", "1e-6", "--json")
    assert rc == 0
    by_rate = json.loads(out)["epsilon"]
    assert by_rate == pytest.approx(compute_epsilon(0.005, 0.864, 2000, 1e-6, "rdp"), rel=1e-12)
    rc, out, _ = _run(capsys, "epsilon", "--noise-multiplier", "0.864", *SO)
    assert rc == 0 and out.startswith("epsilon: ")
    assert float(out.splitlines()[0].split(": ")[1]) == pytest.approx(by_rate, rel=1e-12)


@pytest.mark.parametrize(
    "argv",
    [
        ["calibrate", "--epsilon", "0", *SO],
        ["calibrate", "--epsilon", "-1", *SO],
        ["calibrate", "--epsilon", "2", "--delta", "1", "--population", "100", "--cohort", "5", "--rounds", "5"],
        ["calibrate", "--epsilon", "2", "--delta", "1e-6", "--population", "100", "--cohort", "500", "--rounds", "5"],
        ["calibrate", "--epsilon", "2", "--delta", "1e-6", "--population", "100", "--cohort", "5", "--rounds", "0"],
        ["epsilon", "--noise-multiplier", "1", "--sampling-rate", "1.5", "--rounds", "5", "--delta", "1e-6"],
        ["epsilon", "--noise-multiplier", "-1", *SO],
        ["epsilon", "--noise-multiplier", "1", "--rounds", "5", "--delta", "1e-6"],
        ["calibrate", "--epsilon", "two", *SO],
        ["plan", "--epsilon", "2", "--delta", "1e-6", "--population", "100", "--cohorts", "500",
         "--rounds", "10", "--dim", "10"],
    ],
)
def test_bad_inputs_exit_2_with_one_line(capsys, argv):
    rc, out, err = _run(capsys, *argv)
    assert rc == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and "error" in err


def test_plan_writes_csv_and_png(capsys, tmp_path):
    out_dir = tmp_path / "plan"
    rc, out, _ = _run(capsys, "plan", "--epsilon", "2", "--delta", "1e-6", "--population", "1000000",
                      "--cohorts", "1000", "5000", "--rounds", "100", "400", "--clip-bound", "0.5",
                      "--dim", "1000000", "--out", str(out_dir))
    assert rc == 0 and "σ·C/cohort" in out
    rows = list(csv.DictReader((out_dir / "plan.csv").open()))
    assert [(int(r["cohort"]), int(r["rounds"])) for r in rows] == [(1000, 100), (1000, 400), (5000, 100), (5000, 400)]
    for r in rows:
        sigma, cohort = float(r["noise_multiplier"]), int(r["cohort"])
        assert float(r["epsilon"]) <= 2.0
        assert float(r["noise_std_mean"]) == pytest.approx(sigma * 0.5 / cohort)
        assert float(r["noise_norm_mean"]) == pytest.approx(sigma * 0.5 * 1000 / cohort)
        assert float(r["snr_upper_bound"]) == pytest.approx(cohort / (sigma * 1000))
    assert (out_dir / "plan.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out_dir.iterdir() if p.name.startswith(".")]  # no temp files left
