"""`fastreplay window`: the smoothness screen of each attribution window of one stored run, and
the longest window it recommends. Each window's row is the `smoothness` of a run stored with that
window (the window is not part of the trajectory, so one run serves them all)."""
from __future__ import annotations

import json
import os

import pytest
from conftest import run_module, set_args

# float64 tiny CNN on synthetic data, 8 epochs of 8 steps at a chaotic learning rate: the screen
# falls as the window lengthens (S 0.97, 0.53, 0.36, -0.03 over the last 1, 2, 4, 8 epochs).
CHAOTIC = ["--preset", "test", *set_args(["train.epochs=8", "train.lr=3",
                                          "model.activation=relu"])]


@pytest.fixture(scope="module")
def chaotic_run(tmp_path_factory):
    from typer.testing import CliRunner

    from fastreplay.interface.cli import app
    run_dir = tmp_path_factory.mktemp("window") / "run"
    res = CliRunner().invoke(app, ["train", *CHAOTIC, "--run-dir", str(run_dir)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return run_dir


def test_each_window_is_screened_and_the_longest_smooth_one_recommended(cli, chaotic_run):
    rep = cli.json("window", "--run-dir", chaotic_run)
    rows = rep["rows"]
    assert [r["epochs"] for r in rows] == [1, 2, 4, 8]  # the default: 1, 2, 4, ... and all
    assert [r["start_step"] for r in rows] == [56, 48, 32, 0]
    assert all(r["deterministic"] for r in rows)
    s = [r["metasmoothness"] for r in rows]
    assert s[0] > 0.9 and s[-1] < 0.2, s  # smooth over one epoch, chaotic over the whole run
    longest = max(r["epochs"] for r in rows if r["metasmoothness"] >= rep["min_s"])
    assert rep["recommended_epochs"] == longest == 1
    assert "--set replay.window_epochs=1" in rep["advice"]
    for name in ("window.json", "window.png"):
        assert os.path.getsize(chaotic_run / "window" / name) > 0
    assert json.loads((chaotic_run / "window" / "window.json").read_text()) == rep
    lower = cli.json("window", "--run-dir", chaotic_run, "--epochs", "1,4", "--min-s", "0.3",
                     "--no-plots")  # both pass: the longer one
    assert [r["metasmoothness"] > 0.3 for r in lower["rows"]] == [True, True]
    assert lower["recommended_epochs"] == 4


def test_a_window_row_is_the_smoothness_of_the_run_stored_with_that_window(cli, chaotic_run,
                                                                          tmp_path):
    rep = cli.json("window", "--run-dir", chaotic_run, "--epochs", "2", "--no-plots",
                   "--min-s", "0.99")
    row, = rep["rows"]
    cli("train", *CHAOTIC, "--set", "replay.window_epochs=2", "--run-dir", tmp_path)
    alone = cli.json("smoothness", "--run-dir", tmp_path)
    assert row["metasmoothness"] == alone["metasmoothness"]  # bit for bit
    assert row["curvature_ratio"] == alone["median_curvature_ratio"]
    assert rep["recommended_epochs"] is None and "no window reaches S >= 0.99" in rep["advice"]


@pytest.mark.parametrize("args, message", [
    (["--epochs", "9"], "--epochs 9 is outside the run's 8 epochs"),
    (["--epochs", "one"], "is not a comma-separated list of numbers"),
    (["--min-s", "2"], "--min-s 2 is outside [-1, 1]"),
    (["--keep", "1.5"], "--keep"),
])
def test_window_options_out_of_range_are_one_line_errors(chaotic_run, args, message):
    proc = run_module("window", "--run-dir", chaotic_run, *args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_the_recommended_window_scored_on_the_stored_run_is_what_lds_and_compare_judge(
        cli, chaotic_run, tmp_path):
    """The workflow the recommendation names: `magic --set replay.window_epochs=E` on the run
    `window` screened, then `lds` and `compare` there. They retrain the scored window (not the
    run's own), under their own names in the store, and give bitwise the LDS of a run stored
    with that window from the start."""
    import shutil
    run = tmp_path / "screened"
    shutil.copytree(chaotic_run, run)
    window = set_args(["replay.window_epochs=2"])
    lds = ["--models", "6", "--keep", "0.9", "--no-plots"]
    cli("magic", *CHAOTIC, *window, "--targets", "0:3", "--run-dir", run, "--no-plots")
    screened = cli.json("lds", "--run-dir", run, *lds)
    fresh = tmp_path / "fresh"
    cli("magic", *CHAOTIC, *window, "--targets", "0:3", "--run-dir", fresh, "--no-plots")
    assert cli.json("lds", "--run-dir", fresh, *lds)["per_target"] == screened["per_target"]
    from fastreplay.interface.api import open_trained
    _, store = open_trained(run)
    try:
        assert store.lds_groups() == ["lds/weight_keep0.9_from48"]
    finally:
        store.close()
    out = cli.json("compare", "--run-dir", run, "--methods", "magic", "--keep", "0.9",
                   "--no-plots")
    assert out["group"] == "lds/weight_keep0.9_from48"
    assert out["rows"][0]["per_target"] == screened["per_target"]["lds"]
