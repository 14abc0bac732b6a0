"""Integration on real CIFAR-10 (a small class-balanced subset written by the shared expander)."""
from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest

from conftest import SHARED, set_args
from fastreplay.api import store_path
from fastreplay.config import load_config
from fastreplay.data import load_cifar10, load_data
from fastreplay.store import RunStore

EXPANDER = SHARED / "data" / "expand_cifar10.py"


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    if not EXPANDER.exists():
        pytest.fail(f"{EXPANDER} is missing: the shared CIFAR-10 expander must sit beside the repo")
    root = tmp_path_factory.mktemp("cifar")
    subprocess.run([sys.executable, str(EXPANDER), str(root), "--train", "600", "--test", "100"],
                   check=True, capture_output=True)
    return root


def test_reader_by_structure(cifar_root):
    data = load_cifar10(str(cifar_root))
    assert data.train_x.shape == (600, 3, 32, 32) and data.train_x.dtype == np.uint8
    assert data.test_x.shape == (100, 3, 32, 32)
    assert sorted(np.bincount(data.test_y, minlength=10)) == [10] * 10  # balanced prefix
    assert data.train_x.std() > 20  # real images, not a blank array


def test_reader_accepts_str_keys(cifar_root, tmp_path):
    """Pickles with str keys (re-saved under Python 3) read the same as the bytes-keyed originals."""
    src = cifar_root / "cifar-10-batches-py"
    dst = tmp_path / "cifar-10-batches-py"
    dst.mkdir()
    for f in src.iterdir():
        if f.name.startswith(("data_batch", "test_batch")):
            with open(f, "rb") as fh:
                d = pickle.load(fh, encoding="latin1")  # str keys
            with open(dst / f.name, "wb") as fh:
                pickle.dump({"data": d["data"], "labels": d["labels"]}, fh)
    a, b = load_cifar10(str(cifar_root)), load_cifar10(str(tmp_path))
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.test_y, b.test_y)


def test_missing_data_is_a_clear_error(tmp_path):
    from fastreplay.exceptions import DataError
    with pytest.raises(DataError, match="--download"):
        load_data(load_config("quick", overrides=[f"data.root={tmp_path}"]))


def test_magic_on_real_cifar(cli, cifar_root, tmp_path):
    overrides = [f"data.root={cifar_root}", "data.num_train=600", "data.num_test=100",
                 "train.epochs=1", "train.batch_size=100", "replay.checkpoint_every=2"]
    run_dir = tmp_path / "run"
    out = cli.json("magic", "--preset", "quick", *set_args(overrides), "--targets", "0:3",
                   "--run-dir", run_dir)
    store = RunStore.open(store_path(run_dir))
    scores, attrs = store.read_scores("loss")
    assert scores.shape == (3, 600) and attrs["targets"] == [0, 1, 2]
    assert np.all(np.isfinite(scores)) and np.abs(scores).max() > 0
    assert store.config["data"]["name"] == "cifar10"
    assert len(out["plots"]) == 3 and all((run_dir / "plots").iterdir())
    assert (run_dir / "config.toml").exists()
    # A second call reuses the run and the stored scores (no retraining, no replay).
    again = cli.json("magic", "--preset", "quick", *set_args(overrides), "--targets", "0:3",
                     "--run-dir", run_dir, "--no-plots")
    assert again["replay_seconds"] == 0.0
