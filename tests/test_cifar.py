"""The CIFAR-10 reader and the CLI on CIFAR-10-format data.

Every test but the last runs on a tiny data set written here in the official python layout
(cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta; Python-2-style pickles of dicts
with b"data" (N x 3072 uint8, channel-major) and b"labels"), so the suite needs no file from
outside the repository. Its images are class-dependent coloured stripes plus noise: a tiny CNN
learns them in a few steps. The last test runs the same pipeline on real CIFAR-10 when a copy
is at hand ($CIFAR_ROOT holding cifar-10-batches-py, or the project's CIFAR-10 expander in a
shared/ folder beside the checkout or named by $FASTREPLAY_SHARED) and skips, saying why,
otherwise.
"""
from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import set_args

from fastreplay.config import load_config
from fastreplay.data import CIFAR10_CLASSES, load_cifar10, load_data, subset
from fastreplay.exceptions import DataError
from fastreplay.interface.api import store_path
from fastreplay.store import RunStore

PER_BATCH, N_TEST = 20, 20  # 5 x 20 = 100 training images
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --- a tiny data set in the official format ------------------------------------------------------

class _Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2 ``str`` (opcodes SHORT_BINSTRING/BINSTRING), as the official
    batches were written: they load as bytes with ``encoding="bytes"`` and as str with
    ``encoding="latin1"``."""
    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        head = (pickle.SHORT_BINSTRING + bytes([n]) if n < 256
                else pickle.BINSTRING + n.to_bytes(4, "little"))
        self.write(head + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_py2_str


def _dump_py2(obj, path: Path) -> None:
    with open(path, "wb") as fh:
        _Py2Pickler(fh, protocol=2).dump(obj)


def structured_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 3, 32, 32) uint8: per class a colour and a stripe orientation/frequency, a random
    phase per image, Gaussian pixel noise."""
    yy, xx = np.mgrid[0:32, 0:32] / 32.0
    out = np.empty((len(labels), 3, 32, 32))
    for k, c in enumerate(labels):
        angle, freq = np.pi * c / 10, 2 + c % 3
        wave = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy)
                      + rng.uniform(0, 2 * np.pi))
        colour = np.array([np.cos(2 * np.pi * c / 10), np.sin(2 * np.pi * c / 10), c % 2 * 2 - 1.0])
        out[k] = 128 + 35 * colour[:, None, None] + 45 * wave + rng.normal(0, 25, (3, 32, 32))
    return np.clip(out, 0, 255).astype(np.uint8)


def write_tiny_cifar10(root: Path, per_batch: int = PER_BATCH, n_test: int = N_TEST,
                       seed: int = 0) -> dict:
    """Write ROOT/cifar-10-batches-py; return the images (N, 3, 32, 32) and labels written."""
    rng = np.random.default_rng(seed)
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    written = {"train_x": [], "train_y": []}
    for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        y = rng.permutation(np.arange(n) % 10)  # every class present, in a shuffled order
        x = structured_images(y, rng)
        _dump_py2({b"batch_label": name.encode(), b"labels": [int(v) for v in y],
                   b"data": x.reshape(n, 3 * 32 * 32),
                   b"filenames": [f"{name}_{i}.png".encode() for i in range(n)]}, base / name)
        if name == "test_batch":
            written["test_x"], written["test_y"] = x, y
        else:
            written["train_x"].append(x)
            written["train_y"].append(y)
    _dump_py2({b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_cases_per_batch": per_batch,
               b"num_vis": 3072}, base / "batches.meta")
    written["train_x"] = np.concatenate(written["train_x"])
    written["train_y"] = np.concatenate(written["train_y"])
    return written


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_cifar")
    return root, write_tiny_cifar10(root)


def assert_png(path: Path, width: int, height: int) -> None:
    """A complete, readable, non-blank PNG of about the given size in pixels."""
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    assert raw[-8:-4] == b"IEND", f"{path} is truncated"
    assert len(raw) > 5_000, f"{path}: {len(raw)} bytes is too small for a figure"
    import matplotlib.image
    img = matplotlib.image.imread(path)
    assert abs(img.shape[1] - width) <= 2 and abs(img.shape[0] - height) <= 2, (path, img.shape)
    assert img[..., :3].std() > 0.05, f"{path} is blank"


# --- the reader ----------------------------------------------------------------------------------

def test_reader_reads_the_official_layout(tiny_cifar):
    root, want = tiny_cifar
    for where in (root, root / "cifar-10-batches-py"):  # the parent or the batches folder itself
        data = load_cifar10(str(where))
        assert data.train_x.shape == (5 * PER_BATCH, 3, 32, 32) and data.train_x.dtype == np.uint8
        assert data.test_x.shape == (N_TEST, 3, 32, 32) and data.train_y.dtype == np.int64
        # Pixel for pixel, channel-major, batches 1..5 in order, then the test batch.
        assert np.array_equal(data.train_x, want["train_x"])
        assert np.array_equal(data.train_y, want["train_y"])
        assert np.array_equal(data.test_x, want["test_x"])
        assert np.array_equal(data.test_y, want["test_y"])
        assert data.class_names == CIFAR10_CLASSES


def test_reader_accepts_str_keys(tiny_cifar, tmp_path):
    """Pickles with str keys (re-saved under Python 3) read the same as the bytes-keyed originals."""
    root, _ = tiny_cifar
    src, dst = root / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py"
    dst.mkdir()
    for f in src.iterdir():
        if f.name.startswith(("data_batch", "test_batch")):
            with open(f, "rb") as fh:
                d = pickle.load(fh, encoding="latin1")  # Python 2 strings load as str
            assert "data" in d and b"data" not in d
            with open(dst / f.name, "wb") as fh:
                pickle.dump({"data": d["data"], "labels": d["labels"]}, fh)
    a, b = load_cifar10(str(root)), load_cifar10(str(tmp_path))
    assert np.array_equal(a.train_x, b.train_x) and np.array_equal(a.train_y, b.train_y)
    assert np.array_equal(a.test_x, b.test_x) and np.array_equal(a.test_y, b.test_y)


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="--download"):
        load_data(load_config("quick", overrides=[f"data.root={tmp_path}"]))


def test_failed_download_is_one_line(tmp_path, monkeypatch, capsys):
    """No network (CI, an offline machine): `--download` ends in one error line, exit 2."""
    import urllib.error

    import torchvision.datasets.utils as tv_utils
    from test_robustness import _main

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    code, err = _main(monkeypatch, capsys, "magic", "--preset", "quick", "--targets", "0",
                      "--run-dir", tmp_path / "run", "--download", "--no-plots",
                      "--set", f"data.root={tmp_path / 'cifar'}")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: could not download CIFAR-10 from https://")
    assert "URLError" in lines[0] and "$CIFAR_ROOT" in lines[0]


def test_wrong_shape_is_a_clear_error(tiny_cifar, tmp_path):
    root, _ = tiny_cifar
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for f in (root / "cifar-10-batches-py").iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    _dump_py2({b"data": np.zeros((4, 1024), np.uint8), b"labels": [0] * 4}, base / "data_batch_3")
    with pytest.raises(DataError, match=r"data_batch_3 has data of shape \(4, 1024\)"):
        load_cifar10(str(tmp_path))


def test_subset_is_a_fixed_sample_and_too_large_a_subset_is_refused(tiny_cifar):
    """A smaller run takes a fixed random sample, not a prefix: a copy stored sorted by class
    (CIFAR-10's test batch as some converters write it) would give a one-class prefix."""
    root, want = tiny_cifar
    base = [f"data.root={root}", "train.batch_size=10"]
    cfg = load_config("quick", overrides=[*base, "data.num_train=30", "data.num_test=7"])
    data = load_data(cfg)
    ids = subset(30, 100)
    assert np.array_equal(data.train_x, want["train_x"][ids]) and len(data.test_y) == 7
    assert not np.array_equal(ids, np.arange(30)) and np.all(np.diff(ids) > 0)
    assert np.array_equal(load_data(cfg).train_x, data.train_x)  # the same sample every time
    assert np.array_equal(subset(0, 100), np.arange(100))  # 0 and the whole set: all, in order
    assert np.array_equal(subset(100, 100), np.arange(100))
    labels_sorted = np.repeat(np.arange(10), 1000)  # like the sorted test batch
    assert len(np.unique(labels_sorted[subset(1000, 10000)])) == 10
    with pytest.raises(DataError, match="num_train=500 but the data set has only 100"):
        load_data(load_config("quick", overrides=[*base, "data.num_train=500"]))


# --- the CLI on CIFAR-10-format data -------------------------------------------------------------

# The quick preset's pipeline (cifar10 reader, 32 x 32, crop padding 4, float32 tiny-cnn with
# BatchNorm) shrunk to 10 steps: about a second of training and replay on one core. The preset's
# smooth peak lr (0.02, for 400 steps) leaves 10 steps at chance; lr 0.4 learns the stripes.
TINY = ["data.num_train=100", "data.num_test=20", "train.epochs=2", "train.batch_size=20",
        "model.width=0.5", "train.lr=0.4", "replay.checkpoint_every=4"]


def test_magic_on_cifar_format_data(cli, tiny_cifar, tmp_path):
    root, _ = tiny_cifar
    overrides = [f"data.root={root}", *TINY]
    run_dir = tmp_path / "run"
    out = cli.json("magic", "--preset", "quick", *set_args(overrides), "--targets", "3,7",
                   "--run-dir", run_dir)
    store = RunStore.open(store_path(run_dir))
    scores, attrs = store.read_scores("loss")
    assert scores.shape == (2, 100) and attrs["targets"] == [3, 7]
    assert np.all(np.isfinite(scores)) and np.abs(scores).max() > 0
    assert store.config["data"]["name"] == "cifar10" and store.config["data"]["root"] == str(root)
    # The stripes are learnable: far above chance (0.1) after 10 steps.
    assert out["test_accuracy"] >= 0.5, out["test_accuracy"]
    # One influence figure per target, named for it: 9 x 2 panels at 110 dpi.
    want = [run_dir / "plots" / "target_00003.png", run_dir / "plots" / "target_00007.png"]
    assert sorted(map(Path, out["plots"])) == want
    assert sorted((run_dir / "plots").iterdir()) == want
    for path in want:
        assert_png(path, width=round(1.3 * 9 * 110), height=round(3.2 * 110))
    assert load_config("quick", run_dir / "config.toml").data.root == str(root)
    # A second call reuses the run and the stored scores (no retraining, no replay).
    again = cli.json("magic", "--preset", "quick", *set_args(overrides), "--targets", "3,7",
                     "--run-dir", run_dir, "--no-plots")
    assert again["replay_seconds"] == 0.0 and again["replayed_targets"] == 0
    assert np.array_equal(RunStore.open(store_path(run_dir)).read_scores("loss")[0], scores)


# --- optional: real CIFAR-10 ---------------------------------------------------------------------

def _shared_expander() -> Path | None:
    """The CIFAR-10 expander of the project's shared/ folder, when one is at hand."""
    repo = Path(__file__).resolve().parents[1]
    roots = [Path(os.environ["FASTREPLAY_SHARED"])] if os.environ.get("FASTREPLAY_SHARED") else []
    roots += [repo.parent / "shared", repo / "shared"]
    for shared in roots:
        if (shared / "data" / "expand_cifar10.py").is_file():
            return shared / "data" / "expand_cifar10.py"
    return None


@pytest.fixture(scope="module")
def real_cifar_root(tmp_path_factory) -> Path:
    env_root = os.environ.get("CIFAR_ROOT")
    if env_root and (Path(env_root) / "cifar-10-batches-py" / "test_batch").is_file():
        return Path(env_root)
    expander = _shared_expander()
    if expander is None:
        pytest.skip("no real CIFAR-10 at hand: set $CIFAR_ROOT to a directory holding "
                    "cifar-10-batches-py/, or $FASTREPLAY_SHARED to a shared/ folder with "
                    "data/expand_cifar10.py (the CIFAR-10-format tests above cover the code)")
    root = tmp_path_factory.mktemp("cifar")
    subprocess.run([sys.executable, str(expander), str(root), "--train", "600", "--test", "100"],
                   check=True, capture_output=True)
    return root


def test_magic_on_real_cifar(cli, real_cifar_root, tmp_path):
    data = load_cifar10(str(real_cifar_root))
    assert data.train_x.shape[1:] == (3, 32, 32) and len(data.train_x) >= 600
    assert data.train_x[:600].std() > 20  # real images, not a blank array
    assert set(np.unique(data.train_y[:600])) == set(range(10))
    overrides = [f"data.root={real_cifar_root}", "data.num_train=600", "data.num_test=100",
                 "train.epochs=1", "train.batch_size=100", "replay.checkpoint_every=2"]
    run_dir = tmp_path / "run"
    out = cli.json("magic", "--preset", "quick", *set_args(overrides), "--targets", "0:3",
                   "--run-dir", run_dir)
    store = RunStore.open(store_path(run_dir))
    scores, attrs = store.read_scores("loss")
    assert scores.shape == (3, 600) and attrs["targets"] == [0, 1, 2]
    assert np.all(np.isfinite(scores)) and np.abs(scores).max() > 0
    assert store.config["data"]["name"] == "cifar10"
    want = [run_dir / "plots" / f"target_{t:05d}.png" for t in range(3)]
    assert sorted(map(Path, out["plots"])) == want
    for path in want:
        assert_png(path, width=round(1.3 * 9 * 110), height=round(3.2 * 110))
    again = cli.json("magic", "--preset", "quick", *set_args(overrides), "--targets", "0:3",
                     "--run-dir", run_dir, "--no-plots")
    assert again["replay_seconds"] == 0.0
