"""Bad recipes, data and checkpoints give one clear line, exit code 2, and never damage a run."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pflm.cli import main
from pflm.config import load_recipe
from pflm.errors import ConfigError, PflmError
from pflm.simulation.simulator import Simulator
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"


def run_cli(args, capsys) -> tuple[int, str]:
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.mark.parametrize(
    "override, expected",
    [
        ("server.cohort_sise=3", "did you mean 'cohort_size'"),
        ("privacy.clip_bund=1", "did you mean 'clip_bound'"),
        ("server.rounds=abc", "server.rounds: expected an integer"),
        ("server.rounds=0", "server.rounds must be >= 1"),
        ("privacy.clip_bound=0", "privacy.clip_bound must be > 0"),
        ("privacy.clip_bound=-1", "privacy.clip_bound must be > 0"),
        ("privacy.noise_multiplier=-0.5", "privacy.noise_multiplier must be >= 0"),
        ("device.optimizer=adagrad", "is not one of"),
        ("model.arch=gru", "model.arch must be one of"),
        ("rounds", "not of the form key=value"),
    ],
)
def test_bad_recipe_values(override, expected, synthetic_data, tmp_path, capsys):
    rc, err = run_cli(["train", RECIPE, f"data.dir={synthetic_data}", f"output_dir={tmp_path}", override], capsys)
    assert rc == 2
    assert expected in err
    assert len(err.splitlines()) == 1
    assert not (tmp_path / "tiny_synthetic").exists()


def test_cohort_larger_than_population(synthetic_data, tmp_path, capsys):
    rc, err = run_cli(["train", RECIPE, f"data.dir={synthetic_data}", f"output_dir={tmp_path}", "server.cohort_size=100000"], capsys)
    assert rc == 2 and "exceeds the" in err and "training users" in err


def test_missing_recipe_and_data_dir(tmp_path, capsys):
    rc, err = run_cli(["train", "recipes/nope.yaml"], capsys)
    assert rc == 2 and "not found" in err
    rc, err = run_cli(["train", RECIPE, f"data.dir={tmp_path / 'missing'}", f"output_dir={tmp_path}"], capsys)
    assert rc == 2 and "pflm prepare" in err


def test_incompatible_tokenizer_is_refused(synthetic_data, tmp_path, capsys):
    from pflm.data.prepare import PrepareConfig, prepare
    from pflm.data.tokenizer import TokenizerConfig

    sim = Simulator(load_recipe(RECIPE, tiny_overrides(synthetic_data, str(tmp_path), **{"server.rounds": 1})))
    sim.run(progress=False)
    other = tmp_path / "other"
    prepare(PrepareConfig(out=str(other), corpus="synthetic", synthetic_users=120, tokenizer=TokenizerConfig(vocab_size=250)))
    with pytest.raises(PflmError, match="different tokenizer"):
        Simulator(load_recipe(RECIPE, tiny_overrides(str(other), str(tmp_path), **{"server.rounds": 2})))


def test_corrupt_checkpoint_is_reported_not_loaded(synthetic_data, tmp_path, capsys):
    args = ["train", RECIPE, *tiny_overrides(synthetic_data, str(tmp_path), **{"server.rounds": 2}), "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    run_dir = tmp_path / "tiny_synthetic"
    ckpt = next(run_dir.glob("checkpoint-*.safetensors"))
    good = ckpt.read_bytes()
    ckpt.write_bytes(good[:-10] + b"0123456789")
    model_before = (run_dir / "model.safetensors").read_bytes()
    rc, err = run_cli(["train", RECIPE, *tiny_overrides(synthetic_data, str(tmp_path), **{"server.rounds": 4}), "--no-progress"], capsys)
    assert rc == 2 and "corrupt" in err and len(err.splitlines()) == 1
    assert ckpt.read_bytes()[:-10] == good[:-10]  # nothing overwritten
    assert (run_dir / "model.safetensors").read_bytes() == model_before


def test_tokens_weighting_rejected_with_dp():
    with pytest.raises(ConfigError, match="weighting=tokens"):
        load_recipe(RECIPE, ["server.weighting=tokens", "privacy.noise_multiplier=1.0"])


def test_cli_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pflm", "train", RECIPE, "server.rounds=-1"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["pflm train: error: server.rounds must be >= 1"]
