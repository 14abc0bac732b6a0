"""examples/cifar_cnn.py (a user-written CNN with stock BatchNorm2d on CIFAR-10) runs as its
docstring says, on a tiny data set in the official CIFAR-10 format written here (the real one
is outside the repository): `magic --task` trains, replays and plots, `lds --task` retrains."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import run_module
from test_cifar import write_tiny_cifar10

ROOT = Path(__file__).resolve().parents[1]
TASK = f"{ROOT / 'examples' / 'cifar_cnn.py'}:make_task"
CONFIG = ROOT / "examples" / "cifar_cnn.toml"


def test_the_cifar_example_runs_through_the_cli(tmp_path):
    write_tiny_cifar10(tmp_path / "cifar")  # 100 training and 20 test images
    env = {"CIFAR_ROOT": str(tmp_path / "cifar"), "OMP_NUM_THREADS": "1"}
    short = ["--set", "train.epochs=2", "--set", "train.batch_size=20",
             "--set", "replay.checkpoint_every=3"]
    magic = run_module("magic", "--preset", "test", "--config", CONFIG, *short, "--task", TASK,
                       "--targets", "0:2", "--run-dir", tmp_path / "run", "--json",
                       "--scores-out", tmp_path / "scores.npy", env=env)
    out = json.loads(magic.stdout)
    assert np.load(tmp_path / "scores.npy").shape == (2, 100)
    assert len(out["plots"]) == 2 and all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in out["plots"])
    lds = run_module("lds", "--run-dir", tmp_path / "run", "--task", TASK, "--models", "3",
                     "--keep", "0.9", "--json", "--no-plots", env=env)
    assert np.isfinite(json.loads(lds.stdout)["lds_mean"])
