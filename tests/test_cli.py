"""The everyday commands: show-config, info, clean, bench, and one-line errors."""
from __future__ import annotations

import tomllib
from conftest import SMALL, run_module, set_args

from fastreplay.config import load_config
from fastreplay.interface.api import store_path
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
    import torch

    from fastreplay.core import kernels
    out = cli.json("info")
    assert out["torch"] == torch.__version__
    assert out["extension_loaded"] == kernels.extension_loaded()
    assert out["cuda_kernels"] == kernels.cuda_kernels_built()
    assert out["device"] == (torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")


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


def test_bench_replay_reports_ratios(cli, tmp_path, monkeypatch):
    """Every reported ratio is the quotient of the reported times, the K-measurement replays
    replay K measurements, and store_bytes is the size on disk of the store the run streamed."""
    import math
    import tempfile

    import numpy as np
    import pytest

    import fastreplay.core.replay
    from fastreplay.core.recipe import Recipe

    kept = tmp_path / "bench_tmp"  # keep the benchmark's temporary store to measure it
    kept.mkdir()

    class KeptDir:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return str(kept)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(tempfile, "TemporaryDirectory", KeptDir)
    replays = []
    real_replay = fastreplay.core.replay.replay

    def spy(recipe, store, targets, kind):
        res = real_replay(recipe, store, targets, kind)
        replays.append((list(targets), kind, res))
        return res
    monkeypatch.setattr(fastreplay.core.replay, "replay", spy)

    out = cli.json("bench", "replay", "--device", "cpu", "--preset", "test", "--targets", "1,2")
    cfg = load_config("test")
    recipe = Recipe(cfg)
    assert out["device"] == "cpu" and out["params"] == recipe.model.num_params
    assert out["steps"] == cfg.train.epochs * (cfg.data.num_train // cfg.train.batch_size)
    assert out["replayed_steps"] == out["steps"] - cfg.replay.start_step
    times = ["train_step_s", "eager_nn_train_step_s", "train_run_s", "train_run_streaming_s"]
    times += [f"{name}_replay_step_K{k}{first}_s" for name in ("reference", "fast")
              for k in (1, 2) for first in ("", "_first")]
    times += ["replay_K1_s", "replay_K2_s"]
    assert sorted(times) == sorted(k for k in out if k.endswith("_s"))
    assert all(math.isfinite(out[t]) and out[t] > 0 for t in times)
    denominator = min(out["train_step_s"], out["eager_nn_train_step_s"])
    approx = lambda x: pytest.approx(x, rel=1e-12)  # noqa: E731
    for k in (1, 2):
        assert out[f"fast_vs_reference_K{k}"] == approx(
            out[f"reference_replay_step_K{k}_s"] / out[f"fast_replay_step_K{k}_s"])
        assert out[f"replay_run_per_measurement_K{k}_over_train_run"] == approx(
            (out[f"fast_replay_step_K{k}_s"] + out["train_step_s"]) / k / denominator)
        assert out[f"replay_K{k}_per_measurement_over_train_run"] == approx(
            out[f"replay_K{k}_s"] / k / out["train_run_s"] * out["train_step_s"] / denominator)
        assert out[f"reference_hvp_K{k}"] == "reverse"  # the reference path: double backward
        assert out[f"fast_hvp_K{k}"] in ("reverse", "forward", "forward-vmap")
    assert out["streaming_slowdown"] == approx(out["train_run_streaming_s"] / out["train_run_s"] - 1)
    # The K-measurement replays: targets 0..K-1, scores (K, N), the time reported is theirs.
    assert [(t, kind) for t, kind, _ in replays] == [([0], "loss"), ([0, 1], "loss")]
    for k, (_, _, res) in zip((1, 2), replays):
        assert res.scores.shape == (k, cfg.data.num_train) and np.isfinite(res.scores).all()
        assert out[f"replay_K{k}_s"] == res.seconds
    # store_bytes: the streamed store's size on disk (replay adds nothing to it).
    store_dir = kept / "run.zarr"
    on_disk = sum(f.stat().st_size for f in store_dir.rglob("*") if f.is_file())
    assert out["store_bytes"] == on_disk
    from fastreplay.store import RunStore
    store = RunStore.open(store_dir, mode="r")
    assert store.status == "trained" and len(store.checkpoint_steps()) > 0


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

    from fastreplay.interface.cli import _strict_json
    assert _strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": np.array([np.nan, 2.0])}) \
        == {"a": None, "b": [1.0, None], "c": [None, 2.0]}
