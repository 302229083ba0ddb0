"""`pflm sweep` end to end on the tiny recipe: a process pool trains the points, the table and the privacy–utility
PNG are drawn from the runs' own numbers, finished points are skipped and an interrupted one resumes."""

from __future__ import annotations

import csv
import json
import math
import struct

import pytest

from pflm.cli import main
from pflm.commands.plots import load_sidecar
from pflm.data.corpora.synthetic import generate
from pflm.driver.run import RunDriver
from pflm.evaluation.nbest import Hypothesis, NBestUtterance, write_nbest
from tests.conftest import tiny_overrides

RECIPE = "recipes/tiny_synthetic.yaml"


def _overrides(data: str) -> list[str]:
    # the sweep chooses output_dir/name and threads itself; rounds=4 with checkpoints every 2 rounds (tiny recipe)
    return [o for o in tiny_overrides(data, "unused", **{"server.rounds": 4}) if o.split("=")[0] not in ("output_dir", "threads")]


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def _nbest_files(tmp_path) -> tuple[str, str]:
    """Small N-best lists over synthetic voice-assistant sentences: the reference and two one-word corruptions,
    the first pass preferring a corruption (the rescoring runs the real LM of each point)."""
    texts = [t for t in generate(40, seed=777)["text"] if len(t.split()) >= 3]
    paths = []
    for name, chunk in (("dev", texts[:12]), ("test", texts[12:24])):
        utts = []
        for i, ref in enumerate(chunk):
            w = ref.split()
            bad1 = " ".join(w[:-1] + ["zebra"])
            bad2 = " ".join(["quantum"] + w[1:])
            utts.append(NBestUtterance(f"{name}{i}", ref, (Hypothesis(bad1, -1.0), Hypothesis(ref, -1.02),
                                                           Hypothesis(bad2, -1.05))))
        paths.append(str(write_nbest(tmp_path / f"{name}.jsonl", utts)))
    return paths[0], paths[1]


@pytest.mark.slow
def test_eps_sweep_in_a_process_pool_draws_the_runs_numbers(synthetic_data, tmp_path, capsys):
    out = tmp_path / "sweep"
    dev, test = _nbest_files(tmp_path)
    rc = main(["sweep", RECIPE, "--grid", "privacy.target_epsilon=1,4,inf", "--out", str(out), "--jobs", "2",
               "--threads", "2", "--nbest-dev", dev, "--nbest-test", test, *_overrides(synthetic_data)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "2 at once, 1 threads each" in printed  # 2 CPU threads split between 2 runs
    summaries = {e: json.loads((out / "runs" / f"target_epsilon={e}" / "summary.json").read_text()) for e in ("1", "4", "inf")}
    for e in ("1", "4"):
        s = summaries[e]
        assert s["recipe"]["threads"] == 1 and 0.99 * float(e) <= s["epsilon"] <= float(e)
        assert (out / "runs" / f"target_epsilon={e}" / "curves.png").is_file()  # every train draws its curves
    assert summaries["inf"]["epsilon"] is None and summaries["inf"]["noise_multiplier"] == 0

    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["privacy.target_epsilon"] for r in rows] == ["1", "4", "inf"]
    for r in rows:
        s = summaries[r["privacy.target_epsilon"]]
        assert r["status"].startswith("done") and float(r["test_word_perplexity"]) == s["test_word_perplexity"]
        # tests run with privacy.reproducible=true: the table must not present that ε as a real guarantee
        assert ("REPRODUCIBLE" in r["status"]) == (r["privacy.target_epsilon"] != "inf")
    assert rows[2]["epsilon"] == "inf" and rows[2]["delta"] == ""  # no (ε, δ) claim for the run without noise
    md = (out / "results.md").read_text()
    assert "| ∞ |" in md and "![privacy–utility](privacy_utility.png)" in md

    png = out / "privacy_utility.png"
    w, h = _png_size(png)
    assert w >= 400 and h >= 300 and png.stat().st_size > 10_000
    side = load_sidecar(png)
    panel, wer_panel = side["panels"]  # perplexity and (N-best sets given) rescored WER
    wers = {e: json.loads((out / "runs" / f"target_epsilon={e}" / "rescore" / "summary.json").read_text())
            for e in ("1", "4", "inf")}
    assert [float(r["rescored_wer"]) for r in rows] == [wers[e]["rescored_wer"] for e in ("1", "4", "inf")]
    assert wer_panel["lines"][0]["y"] == [wers["1"]["rescored_wer"], wers["4"]["rescored_wer"]]
    assert wer_panel["hlines"][0]["y"] == wers["inf"]["rescored_wer"] and wers["inf"]["test_utterances"] == 12
    assert wer_panel["hlines"][1] == {"label": "first pass (no LM rescoring)", "y": wers["1"]["first_pass_wer"]}
    (line,) = panel["lines"]
    assert line["x"] == [summaries["1"]["epsilon"], summaries["4"]["epsilon"]]
    assert line["y"] == [summaries["1"]["test_word_perplexity"], summaries["4"]["test_word_perplexity"]]
    assert panel["hlines"] == [{"label": "no DP (ε = ∞)", "y": summaries["inf"]["test_word_perplexity"]}]
    lo, hi = panel["ylim"]
    assert lo <= min(line["y"] + [panel["hlines"][0]["y"]]) and max(line["y"]) <= hi
    assert panel["xscale"] == "log" and panel["xlim"][0] <= line["x"][0] and line["x"][-1] <= panel["xlim"][1]
    assert side["not_private"] is False


@pytest.mark.slow
def test_finished_points_are_skipped_and_an_interrupted_one_resumes(synthetic_data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    argv = ["sweep", RECIPE, "--grid", "privacy.clip_bound=0.5,1", "--out", str(out), "--threads", "1",
            *_overrides(synthetic_data)]
    real_round = RunDriver.run_round

    def crash_in_round_3(self, r):
        if self.cfg.privacy.clip_bound == 1.0 and r == 3:
            raise RuntimeError("simulated crash")
        return real_round(self, r)

    monkeypatch.setattr(RunDriver, "run_round", crash_in_round_3)
    assert main(argv) == 1  # one point failed; the other finished
    err = capsys.readouterr().err
    assert "rerun the same command" in err
    crashed = out / "runs" / "clip_bound=1"
    assert not (crashed / "summary.json").exists() and (crashed / "checkpoint-000002.safetensors").exists()
    before = (crashed / "metrics.jsonl").read_text().splitlines()
    rows = {r["privacy.clip_bound"]: r for r in csv.DictReader((out / "results.csv").open())}
    assert rows["1"]["status"].startswith("failed: RuntimeError: simulated crash") and rows["0.5"]["status"] == "done"
    done_summary = (out / "runs" / "clip_bound=0.5" / "summary.json").stat().st_mtime_ns

    monkeypatch.setattr(RunDriver, "run_round", real_round)
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "clip_bound=0.5: finished" in printed and "1 to run" in printed
    assert (out / "runs" / "clip_bound=0.5" / "summary.json").stat().st_mtime_ns == done_summary  # not retrained
    after = (crashed / "metrics.jsonl").read_text().splitlines()
    assert after[:2] == before[:2] and [json.loads(x)["round"] for x in after] == [0, 1, 2, 3]  # resumed at round 2
    assert json.loads((crashed / "summary.json").read_text())["rounds"] == 4
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows] == ["done", "done"] and all(r["epsilon"] == "inf" for r in rows)  # σ = 0
    assert all(math.isfinite(float(r["test_perplexity"])) for r in rows)

    # more rounds for every point: none is finished any more, each resumes from its last checkpoint
    assert main([*argv, "server.rounds=5", "--dry-run"]) == 0
    assert capsys.readouterr().out.count(": pending") == 2
    # a different recipe under the same sweep dir is refused up front (one line), before anything is written
    before = (out / "sweep.json").read_bytes()
    assert main([*argv, "device.lr=0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "device.lr" in err and "new --out DIR" in err and len(err.splitlines()) == 1
    assert (out / "sweep.json").read_bytes() == before
