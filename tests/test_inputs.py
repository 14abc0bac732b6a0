"""A store records what it was trained on beyond the config (the model's structure and initial
weights, the data's content); a later command that builds other inputs is refused, not silently
matched to the old run."""
from __future__ import annotations

import pytest
import torch

import fastreplay.models as models
import fastreplay.recipe as recipe_module
from fastreplay.api import open_or_train, open_trained
from fastreplay.config import load_config
from fastreplay.exceptions import StoreError
from fastreplay.inputs import ATTR, data_fingerprint, model_fingerprint

CFG = ["train.epochs=1", "data.num_train=32", "data.num_test=8"]


def _train(run_dir):
    recipe, store = open_or_train(load_config("test", overrides=CFG), run_dir)
    recorded = store.get_attr(ATTR)
    store.close()
    return recipe, recorded


def test_the_store_records_the_model_and_data_it_was_trained_on(tmp_path):
    recipe, recorded = _train(tmp_path)
    assert recorded == {"model": model_fingerprint(recipe.model),
                        "data": data_fingerprint(recipe.data)}
    _, store = open_trained(tmp_path)  # same inputs: opens
    store.close()
    _, store = open_or_train(load_config("test", overrides=CFG), tmp_path)  # reused
    store.close()


def test_edited_data_after_the_run_is_a_clear_error(tmp_path, monkeypatch):
    _train(tmp_path)
    real = recipe_module.load_data

    def one_label_changed(cfg, download=False):
        data = real(cfg, download)
        data.train_y = data.train_y.copy()
        data.train_y[3] = (data.train_y[3] + 1) % cfg.data.num_classes
        return data

    monkeypatch.setattr(recipe_module, "load_data", one_label_changed)
    for reopen in (lambda: open_trained(tmp_path),
                   lambda: open_or_train(load_config("test", overrides=CFG), tmp_path)):
        with pytest.raises(StoreError, match=r"different data \(the training or test images or "
                                             r"labels\).*--force"):
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
