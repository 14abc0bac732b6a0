"""A store records what it was trained on beyond the config (the model's structure and initial
weights, the data's content); a later command that builds other inputs is refused, not silently
matched to the old run."""
from __future__ import annotations

import re

import pytest
import torch

import fastreplay.core.models as models
import fastreplay.data as data_module
from fastreplay.config import load_config
from fastreplay.exceptions import StoreError
from fastreplay.interface.api import open_or_train, open_trained
from fastreplay.store.inputs import ATTR, data_fingerprint, model_fingerprint
from fastreplay.task import code_fingerprint

CFG = ["train.epochs=1", "data.num_train=32", "data.num_test=8"]


def _train(run_dir):
    recipe, store = open_or_train(load_config("test", overrides=CFG), run_dir)
    recorded = store.get_attr(ATTR)
    store.close()
    return recipe, recorded


def test_the_store_records_the_model_and_data_it_was_trained_on(tmp_path):
    recipe, recorded = _train(tmp_path)
    assert recorded == {"model": model_fingerprint(recipe.model),
                        "data": data_fingerprint(recipe.data),
                        "task": code_fingerprint(recipe.task)}
    _, store = open_trained(tmp_path)  # same inputs: opens
    store.close()
    _, store = open_or_train(load_config("test", overrides=CFG), tmp_path)  # reused
    store.close()


def test_edited_data_after_the_run_is_a_clear_error(tmp_path, monkeypatch):
    _train(tmp_path)
    real = data_module.load_data

    def one_label_changed(cfg, download=False):
        data = real(cfg, download)
        data.train_y = data.train_y.copy()
        data.train_y[3] = (data.train_y[3] + 1) % cfg.data.num_classes
        return data

    monkeypatch.setattr(data_module, "load_data", one_label_changed)
    for reopen in (lambda: open_trained(tmp_path),
                   lambda: open_or_train(load_config("test", overrides=CFG), tmp_path)):
        with pytest.raises(StoreError, match=r"different data \(the training or test inputs or "
                                             r"targets\).*--force"):
            reopen()


def test_a_model_that_builds_differently_is_a_clear_error(tmp_path, monkeypatch):
    _train(tmp_path)
    real = models.build_module

    def nudged(cfg):
        module = real(cfg)
        with torch.no_grad():
            next(module.parameters()).view(-1)[0] += 1e-3  # other initial weights, same shapes
        return module

    monkeypatch.setattr(models, "build_module", nudged)
    with pytest.raises(StoreError, match=r"different model \(its structure or initial weights\)"):
        open_trained(tmp_path)
    # --force discards the old run and trains on the new inputs
    _, store = open_or_train(load_config("test", overrides=CFG), tmp_path, force=True)
    store.close()
    _, store = open_trained(tmp_path)
    store.close()


def _images(n=16, size=8, classes=2, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8), rng.integers(0, classes, n)


def _own_data(**changes):
    from fastreplay.data import ImageData
    (tx, ty), (vx, vy) = _images(32), _images(8, seed=1)
    fields = dict(train_x=tx, train_y=ty, test_x=vx, test_y=vy, class_names=("a", "b"))
    fields.update(changes)
    return ImageData(**fields)


def test_own_images_are_trained_on_and_recorded(tmp_path):
    """A user's ImageData replaces data.name; reopening without it (the config's synthetic
    set) is refused by the data fingerprint."""
    cfg = load_config("test", overrides=["data.num_classes=2", "train.epochs=1",
                                         "train.batch_size=8"])
    data = _own_data()
    recipe, store = open_or_train(cfg, tmp_path, data=data)
    store.close()
    assert recipe.num_train == 32 and recipe.data.train_y.dtype == torch.int64
    _, store = open_trained(tmp_path, data=data)
    store.close()
    with pytest.raises(StoreError, match="different data"):
        open_trained(tmp_path)


@pytest.mark.parametrize("changes, message", [
    ({"train_x": _images()[0].astype("float32")}, "train_x must be a uint8 numpy array"),
    ({"test_x": _images(8)[0][:, :1]}, "test_x must be a uint8 numpy array (N, 3, H, W)"),
    ({"test_x": _images(8, size=6)[0]}, "train and test images must share one square size"),
    ({"train_y": _images()[1][:5]}, "train_y must hold one integer label per image (32)"),
    ({"train_y": _images()[1] + 0.5}, "train_y must hold one integer label per image"),
    ({"test_y": _images(8, classes=3)[1] + 1}, "test_y has labels outside [0, 2)"),
])
def test_malformed_own_images_are_one_line_errors(changes, message):
    from fastreplay.data import check_image_data
    from fastreplay.exceptions import DataError
    with pytest.raises(DataError, match=re.escape(message)):
        check_image_data(_own_data(**changes), num_classes=2)
