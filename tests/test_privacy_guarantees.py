"""Attacker-style tests of what a DP run releases: each one fails on the code before the privacy review's fixes.

The adversary knows the recipe (including its public `seed`) and reads everything a run publishes:
model.safetensors, metrics.jsonl, summary.json, the console. Secrets (the run key) stay in the run directory.
"""

from __future__ import annotations

import json
import stat

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pflm.config import load_recipe
from pflm.errors import ConfigError
from pflm.privacy.accountant import compute_epsilon
from pflm.secure_random import SecureRandom, derive_key, subkey
from pflm.server.run_key import KEY_FILE
from pflm.server.sampling import sample_cohort
from pflm.driver.metrics import DIAGNOSTICS_FILE, RELEASED
from pflm.simulation.simulator import Simulator
from tests.conftest import crash_at_round, tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"
DP = {"privacy.noise_multiplier": 1.0, "server.rounds": 4, "server.cohort_size": 8, "privacy.reproducible": "false"}


def _sim(data: str, out, **kw) -> Simulator:
    return Simulator(load_recipe(RECIPE, tiny_overrides(data, str(out), **{**DP, **kw})))


def _weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _metrics(run_dir) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ---- 1. the central noise is not reproducible from the recipe -----------------------------------------------
def test_two_runs_of_one_recipe_release_different_noise(synthetic_data, tmp_path):
    runs = []
    for name in ("a", "b"):
        _sim(synthetic_data, tmp_path / name).run(progress=False)
        runs.append(tmp_path / name / "tiny_synthetic")
    assert not _same(_weights(runs[0]), _weights(runs[1])), "same recipe + seed released the same noise"
    for run in runs:
        key_file = run / KEY_FILE
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_bytes()
        assert key != derive_key(0)  # not the seed-derived key an attacker can compute
        for public in ("recipe.json", "summary.json", "metrics.jsonl", "model.safetensors"):
            assert key not in (run / public).read_bytes()
    summary = json.loads((runs[0] / "summary.json").read_text())
    assert summary["reproducible"] is False and "privacy_warning" not in summary


def test_reproducible_mode_is_reproducible_and_says_so(synthetic_data, tmp_path):
    for name in ("a", "b"):
        _sim(synthetic_data, tmp_path / name, **{"privacy.reproducible": "true"}).run(progress=False)
    a, b = tmp_path / "a" / "tiny_synthetic", tmp_path / "b" / "tiny_synthetic"
    assert _same(_weights(a), _weights(b))
    assert not (a / KEY_FILE).exists()
    summary = json.loads((a / "summary.json").read_text())
    assert summary["reproducible"] is True and "does NOT hold" in summary["privacy_warning"]


# ---- 2. no private counts in the released model ----------------------------------------------------------------
def test_dp_run_refuses_vocabulary_and_prior_from_private_counts(private_synthetic_data, tmp_path):
    with pytest.raises(ConfigError, match="private data.*--tokenizer-input wordfreq"):
        _sim(private_synthetic_data, tmp_path)
    _sim(private_synthetic_data, tmp_path, **{"privacy.noise_multiplier": 0.0})  # non-private runs may use them


def test_output_bias_does_not_encode_training_counts(synthetic_data, tmp_path):
    from pflm.data.store import FederatedData

    sim = _sim(synthetic_data, tmp_path)
    bias = sim.server.model.output_bias().detach().double().numpy()
    exact = FederatedData.open(synthetic_data).token_counts().astype(np.float64)
    # The old attack: bias = log((count + 1) / Z) ⇒ count_w ∝ exp(bias_w) − 1 for every word.
    words = np.arange(4, exact.size)
    recovered = np.exp(bias[words] - bias[words].max()) * (exact[words].max() + 1) - 1
    seen = exact[words] > 0
    assert not np.allclose(recovered[seen], exact[words][seen], rtol=1e-3), "training counts readable from the bias"


# ---- 3. noise from the expected cohort under Poisson sampling --------------------------------------------------
def test_noise_std_is_constant_under_poisson_sampling(synthetic_data, tmp_path):
    _sim(synthetic_data, tmp_path, **{"server.rounds": 6, "diagnostics": "true"}).run(progress=False)
    run = tmp_path / "tiny_synthetic"
    stds = {m["noise_std_sum"] for m in _metrics(run)}
    assert stds == {1.0}  # σ·C·m̄/M = 1·1·8/8, whatever the realised cohort
    lines = (run / DIAGNOSTICS_FILE).read_text().splitlines()
    cohorts = [json.loads(x)["cohort"] for x in lines[1:]]
    assert len(set(cohorts)) > 1, "Poisson cohorts should vary in size (else the test proves nothing)"


# ---- 4. the cohort is secret ------------------------------------------------------------------------------------
def test_cohort_cannot_be_recomputed_from_the_seed():
    old_way = [sorted(np.flatnonzero(np.random.default_rng([0, r, 0xC0]).random(1000) < 0.02).tolist())
               for r in range(5)]
    rng = SecureRandom(subkey(b"k" * 32, "cohort-sampling"))
    new = [sample_cohort(1000, 20, "poisson", rng, r) for r in range(5)]
    assert all(a != b for a, b in zip(old_way, new))
    again = SecureRandom(subkey(b"k" * 32, "cohort-sampling"))
    assert new == [sample_cohort(1000, 20, "poisson", again, r) for r in range(5)]  # same key: same cohorts
    other = SecureRandom(subkey(b"j" * 32, "cohort-sampling"))
    assert new != [sample_cohort(1000, 20, "poisson", other, r) for r in range(5)]


def test_fixed_size_sampling_is_refused_under_dp(synthetic_data, tmp_path):
    with pytest.raises(ConfigError, match="server.sampling=poisson"):
        _sim(synthetic_data, tmp_path, **{"server.sampling": "fixed"})


# ---- 5. metrics hold no exact values ---------------------------------------------------------------------------
def test_metrics_hold_only_released_values(synthetic_data, tmp_path):
    adaptive = {"privacy.adaptive_clipping.enabled": "true", "privacy.adaptive_clipping.count_noise_std": 2.0}
    _sim(synthetic_data, tmp_path / "plain", **adaptive).run(progress=False)
    run = tmp_path / "plain" / "tiny_synthetic"
    rows = _metrics(run)
    for m in rows:
        assert set(m) <= RELEASED, set(m) - RELEASED
        for leak in ("fraction_clipped", "train_loss", "cohort", "contributors", "nonfinite_dropped"):
            assert leak not in m
    assert "noisy_unclipped_fraction" in rows[0]
    assert not (run / DIAGNOSTICS_FILE).exists()  # opt-in only

    _sim(synthetic_data, tmp_path / "diag", **adaptive, diagnostics="true").run(progress=False)
    lines = (tmp_path / "diag" / "tiny_synthetic" / DIAGNOSTICS_FILE).read_text().splitlines()
    assert lines[0].startswith("# NOT PRIVATE")
    assert "fraction_clipped" in json.loads(lines[1]) and "train_loss" in json.loads(lines[1])


def _all_updates_nan_in_round(sim: Simulator, monkeypatch, round_idx: int) -> None:
    """The adversary's lever: data that makes training diverge (every update of the round NaN)."""
    real_train, real_round = sim.fanout.trainer.train, sim.run_round
    current = {}

    def run_round(r):
        current["r"] = r
        return real_round(r)

    def train(user_id, sentences, device_key):
        res = real_train(user_id, sentences, device_key)
        if current["r"] == round_idx:
            res.update[0] = float("nan")
        return res

    monkeypatch.setattr(sim, "run_round", run_round)
    monkeypatch.setattr(sim.fanout.trainer, "train", train)


@pytest.mark.parametrize("aggregation", ["plain", "secure"])
def test_a_round_where_nobody_contributes_is_still_a_noised_charged_release(synthetic_data, tmp_path, monkeypatch,
                                                                            aggregation):
    """Whether any update reached the sum is a fact about the users' data (here: it all diverged). Before the fix
    the round "failed": metrics said so and ε did not move, so an observer learned it. Now Σ over the empty set
    (= 0) gets the usual noise and charge, and the published rows look like any other round's."""
    # cohort 16: a Poisson cohort under 3 devices (a SecAgg failure) then has probability ~1e-5 per round
    kw = {"server.rounds": 3, "aggregation.kind": aggregation, "server.cohort_size": 16, "server.eval_every": 5}
    sim = _sim(synthetic_data, tmp_path / "nan", **kw)
    _all_updates_nan_in_round(sim, monkeypatch, 1)
    before = {k: v.clone() for k, v in sim.server.model.state_dict().items()}
    sim.run(progress=False)
    rows = _metrics(tmp_path / "nan" / "tiny_synthetic")
    assert [m["round"] for m in rows] == [0, 1, 2] and all("failed" not in m for m in rows)
    assert set(rows[1]) == set(rows[0])  # the same published keys as a normal round
    eps = [m["epsilon"] for m in rows]
    assert eps[0] < eps[1] < eps[2]  # round 1 was charged like the others
    sim_ok = _sim(synthetic_data, tmp_path / "ok", **kw)
    sim_ok.run(progress=False)
    assert [m["epsilon"] for m in _metrics(tmp_path / "ok" / "tiny_synthetic")] == eps
    after = sim.server.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_without_dp_a_round_without_contributions_still_fails(synthetic_data, tmp_path, monkeypatch):
    sim = _sim(synthetic_data, tmp_path, **{"privacy.noise_multiplier": 0.0, "server.rounds": 1})
    _all_updates_nan_in_round(sim, monkeypatch, 0)
    before = {k: v.clone() for k, v in sim.server.model.state_dict().items()}
    m = sim.run_round(0)
    assert "failed" in m and sim.server.rounds_done == 0
    assert all(torch.equal(v, before[k]) for k, v in sim.server.model.state_dict().items())


# Keys of metrics.jsonl that may differ between rounds: noised releases, their post-processing, and public values.
VARYING_OK = {"round", "epsilon", "update_norm", "noise_norm_mean", "seconds", "val_perplexity",
              "val_word_perplexity", "clip_bound", "next_clip_bound", "noisy_unclipped_fraction"}


def test_secure_dp_metrics_do_not_reveal_the_realised_cohort_size(synthetic_data, tmp_path):
    """The SecAgg encoding step (and every protocol count) is a function of the realised Poisson cohort; it used to
    be published as `secagg_quant_step`, from which the adversary reads the cohort size of each round."""
    _sim(synthetic_data, tmp_path, **{"aggregation.kind": "secure", "server.rounds": 6, "diagnostics": "true",
                                      "server.cohort_size": 16,
                                      "server.eval_every": 100}).run(progress=False)
    run = tmp_path / "tiny_synthetic"
    cohorts = [json.loads(x)["cohort"] for x in (run / DIAGNOSTICS_FILE).read_text().splitlines()[1:]]
    assert len(set(cohorts)) > 1, "Poisson cohorts should vary in size (else the test proves nothing)"
    rows = _metrics(run)
    for key in set().union(*rows) - VARYING_OK:
        assert len({json.dumps(m.get(key)) for m in rows}) == 1, f"{key} varies with the realised cohort"


def test_a_failed_round_publishes_no_counts(synthetic_data, tmp_path, monkeypatch):
    """A SecAgg failure message names survivor and cohort counts; metrics.jsonl gets a fixed text instead."""
    sim = _sim(synthetic_data, tmp_path, **{"aggregation.kind": "secure", "server.rounds": 1, "diagnostics": "true"})
    from pflm.errors import AggregationFailed

    def fail():
        raise AggregationFailed("only 2 of 7 devices completed key sharing, fewer than the threshold 4")

    monkeypatch.setattr(sim.aggregator, "finalize", fail)
    sim.run(progress=False)
    run = tmp_path / "tiny_synthetic"
    published = (run / "metrics.jsonl").read_text()
    assert "failed" in published and not any(ch.isdigit() for ch in json.loads(published)["failed"])
    assert "of 7 devices" in (run / DIAGNOSTICS_FILE).read_text()


# ---- 6. resume never re-releases a round -----------------------------------------------------------------------
RESUME = {"server.rounds": 5, "server.checkpoint_every": 2}


def test_resumed_run_repeats_the_same_releases_and_counts_them_once(synthetic_data, tmp_path, monkeypatch):
    crashed = _sim(synthetic_data, tmp_path / "b", **RESUME)
    crash_at_round(crashed, monkeypatch, 3)  # round 2 was released, the checkpoint is after round 1: round 2 is redone
    run = tmp_path / "b" / "tiny_synthetic"
    (tmp_path / "a" / "tiny_synthetic").mkdir(parents=True)
    (tmp_path / "a" / "tiny_synthetic" / KEY_FILE).write_bytes((run / KEY_FILE).read_bytes())
    (tmp_path / "a" / "tiny_synthetic" / KEY_FILE).chmod(0o600)
    ref = _sim(synthetic_data, tmp_path / "a", **RESUME).run(progress=False)
    resumed = _sim(synthetic_data, tmp_path / "b", **RESUME).run(progress=False)
    assert _same(_weights(run), _weights(tmp_path / "a" / "tiny_synthetic"))
    ledger = (run / "releases.jsonl").read_text().splitlines()
    assert ledger == (tmp_path / "a" / "tiny_synthetic" / "releases.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in ledger] == list(range(5))  # the redo of round 2 was identical
    expected = compute_epsilon(8 / 96, 1.0, 5, 1e-6)  # five releases, each counted once
    assert resumed["epsilon"] == pytest.approx(expected, rel=1e-9) and resumed["epsilon"] == ref["epsilon"]


def test_redone_round_with_a_different_release_is_charged_twice(synthetic_data, tmp_path, monkeypatch):
    crashed = _sim(synthetic_data, tmp_path, **RESUME)
    crash_at_round(crashed, monkeypatch, 3)
    run = tmp_path / "tiny_synthetic"
    (run / KEY_FILE).unlink()  # the key is lost: the redo of round 2 releases different noise
    resumed = _sim(synthetic_data, tmp_path, **RESUME).run(progress=False)
    rows = {m["round"]: m for m in _metrics(run)}
    assert rows[2]["releases_of_round"] == 2
    assert resumed["epsilon"] == pytest.approx(compute_epsilon(8 / 96, 1.0, 6, 1e-6), rel=1e-9)


def test_a_redo_with_a_different_aggregate_gets_fresh_noise(synthetic_data, tmp_path, monkeypatch):
    """Attack: a resumed round whose aggregate differs (on real devices their local randomness differs) but whose
    noise were the same would give release₁ − release₂ = sum₁ − sum₂ exactly. The redo must draw fresh noise (and be
    charged twice); an identical redo keeps the same noise (see the test above)."""
    from pflm.privacy.noise import GaussianNoisePostprocessor

    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (round, exact sum, released sum)
    real = GaussianNoisePostprocessor.on_server

    def spy(self, agg, ctx):
        out, m = real(self, agg, ctx)
        seen.append((ctx.round, agg.total.clone().double(), out.total.clone().double()))
        return out, m

    monkeypatch.setattr(GaussianNoisePostprocessor, "on_server", spy)
    crashed = _sim(synthetic_data, tmp_path, **RESUME)
    crash_at_round(crashed, monkeypatch, 3)  # round 2 released, checkpoint after round 1
    resumed = _sim(synthetic_data, tmp_path, **RESUME)
    finalize = resumed.aggregator.finalize

    def changed():  # the redo of round 2: one device's update differs a little
        res = finalize()
        if not any(r == 2 for r, _, _ in seen[3:]):
            res.total[:5] += 0.01
        return res

    resumed.aggregator.finalize = changed
    summary = resumed.run(progress=False)
    (r1, exact1, rel1), (r2, exact2, rel2) = [x for x in seen if x[0] == 2]
    assert not torch.equal(exact1, exact2)
    leak = (rel1 - rel2) - (exact1 - exact2)  # zero if the noise were reused
    assert float(leak.norm()) > 0.5 * float((rel1 - exact1).norm())
    rows = {m["round"]: m for m in _metrics(tmp_path / "tiny_synthetic")}
    assert rows[2]["releases_of_round"] == 2
    assert summary["epsilon"] == pytest.approx(compute_epsilon(8 / 96, 1.0, 6, 1e-6), rel=1e-9)


# ---- 8. honest reporting ---------------------------------------------------------------------------------------
def test_cli_states_the_guarantee_and_the_simulated_users_epsilon(synthetic_data, tmp_path, capsys):
    from pflm.cli import main

    args = tiny_overrides(synthetic_data, str(tmp_path), **{**DP, "privacy.population": 100000,
                                                                   "privacy.noise_cohort": 1000})
    assert main(["train", RECIPE, *args, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "rdp accountant" in out and "delta 1e-06" in out and "Poisson" in out
    assert "population of 100000 users" in out and "vocabulary: public, prior: public" in out
    summary = json.loads((tmp_path / "tiny_synthetic" / "summary.json").read_text())
    assert summary["simulated_users_epsilon"] > 10 * summary["epsilon"]  # σ·8/1000 protects the simulated users little
    assert "simulated_users_epsilon" in out
