"""The everyday commands: show-config, info, clean, bench, and one-line errors."""
from __future__ import annotations

import tomllib

from conftest import SMALL, run_module, set_args
from fastreplay.api import store_path
from fastreplay.config import load_config
from fastreplay.store import RunStore


def test_show_config_resolves_preset_file_and_overrides(cli, tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('seed = 7\n[train]\nlr = 0.3\nepochs = 5\n')
    out = cli("show-config", "--preset", "full", "--config", cfg_file, "--set", "train.lr=0.25")
    d = tomllib.loads(out.stdout)
    assert d["seed"] == 7 and d["train"]["epochs"] == 5 and d["train"]["lr"] == 0.25
    assert d["model"]["name"] == "resnet9"  # from the preset
    assert load_config("full", cfg_file, ["train.lr=0.25"]).train.lr == 0.25


def test_bad_override_is_one_line_error():
    proc = run_module("show-config", "--set", "train.lrr=0.1", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "train.lrr" in proc.stderr
    proc = run_module("show-config", "--set", "train.dtype=float16", check=False)
    assert proc.returncode == 2 and "float32 or float64" in proc.stderr
    proc = run_module("show-config", "--set", "replay.schedule=every", check=False)
    assert proc.returncode == 2 and "replay.checkpoint_every=1" in proc.stderr


def test_info_json(cli):
    out = cli.json("info")
    assert {"torch", "extension_loaded", "cuda_kernels", "device"} <= set(out)


def test_clean_checkpoints_keeps_scores(cli, tmp_path):
    run_dir = tmp_path / "run"
    cli("magic", "--preset", "test", *set_args(SMALL), "--targets", "0,1", "--run-dir", run_dir,
        "--no-plots")
    before = RunStore.open(store_path(run_dir)).nbytes_on_disk()
    cli("clean", run_dir, "--what", "checkpoints")
    store = RunStore.open(store_path(run_dir))
    assert store.nbytes_on_disk() < before
    scores, attrs = store.read_scores("loss")
    assert scores.shape == (2, 48)
    # Stored targets are still served; new ones need the checkpoints and say so.
    cli("magic", "--preset", "test", *set_args(SMALL), "--targets", "0", "--run-dir", run_dir,
        "--no-plots")
    proc = run_module("magic", "--preset", "test", *set_args(SMALL), "--targets", "3",
                      "--run-dir", run_dir, "--no-plots", check=False)
    assert proc.returncode == 2 and "--force" in proc.stderr


def test_bench_replay_reports_ratios(cli):
    out = cli.json("bench", "replay", "--device", "cpu", "--preset", "test", "--targets", "1,2")
    for k in (1, 2):
        assert out[f"reference_replay_step_K{k}_s"] > 0 and out[f"fast_replay_step_K{k}_s"] > 0
        assert out[f"replay_K{k}_s"] > 0 and out[f"replay_K{k}_per_measurement_over_train_run"] > 0
    assert out["train_step_s"] > 0 and out["eager_nn_train_step_s"] > 0
    assert out["store_bytes"] > 0 and "streaming_slowdown" in out


def test_window_scores_are_stored_apart(cli, tmp_path):
    """Scores of another attribution window are another quantity: never served from the cache."""
    run_dir = tmp_path / "run"
    base = ["magic", "--preset", "test", *set_args(SMALL), "--targets", "0", "--run-dir", run_dir,
            "--no-plots"]
    cli(*base)
    out = cli.json(*base, "--set", "replay.start_step=4")
    assert out["replayed_targets"] == 1
    store = RunStore.open(store_path(run_dir))
    assert set(store.score_names()) == {"loss", "loss_from4"}
    full, _ = store.read_scores("loss")
    window, _ = store.read_scores("loss_from4")
    assert not (full == window).all()


def test_json_output_is_strict():
    """Undefined statistics (NaN) print as null, never as the non-JSON token NaN."""
    import numpy as np
    from fastreplay.cli import _strict_json
    assert _strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": np.array([np.nan, 2.0])}) \
        == {"a": None, "b": [1.0, None], "c": [None, 2.0]}
