"""A user's own Task (fastreplay.task): tabular ArrayData, stock BatchNorm1d and LayerNorm, a
custom loss, measurement, augmentation and weight-decay rule, held to the exactness standard of
the built-in models (float64 finite differences of real retrainings, <= 1e-6 relative), through
the Python API in every HVP mode and adjoint backend and through the CLI's --task; and the
one-line errors for tasks that cannot run."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, run_module, set_args
from test_exactness import (
    TARGETS,
    assert_matches_finite_differences,
    central_differences,
    one_thread,
)
from test_stock_norms import train_store

from fastreplay.config import load_config
from fastreplay.core import kernels
from fastreplay.core.recipe import Recipe
from fastreplay.core.replay import replay
from fastreplay.exceptions import ConfigError, DataError
from fastreplay.interface.api import counterfactual
from fastreplay.task import ArrayData, Task, load_task

TASK_FILE = Path(__file__).parent / "tasks" / "tabular_task.py"
SPEC = f"{TASK_FILE}:make_task"
# SMALL's optimizer and schedule (float64, 12 steps of 12 examples, momentum, decay, one-cycle,
# bias lr x2); the task brings its own data, so SMALL's data keys do not apply.
OVERRIDES = SMALL + ["measure.kind=margin"]


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    cfg = load_config("test", overrides=OVERRIDES)
    recipe = Recipe(cfg, task=load_task(SPEC))
    with one_thread():
        examples, fd = central_differences(
            lambda w: counterfactual(cfg, w, TARGETS, recipe=recipe), recipe.num_train)
        store = train_store(recipe, tmp_path_factory.mktemp("task") / "run.zarr")
    yield examples, fd, store
    store.close()


@pytest.mark.parametrize("hvp", ["reverse", "forward", "forward-vmap"])
@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_own_task_scores_match_finite_differences(scored_run, backend, hvp):
    if backend == "fused" and not kernels.extension_loaded():
        pytest.skip(f"compiled extension not loaded: {kernels.extension_error()}")
    examples, fd, store = scored_run
    cfg = load_config("test", overrides=OVERRIDES + [f"replay.backend={backend}",
                                                     f"replay.hvp={hvp}"])
    with one_thread():
        scores = replay(Recipe(cfg, task=load_task(SPEC)), store, TARGETS, "margin").scores
    assert_matches_finite_differences(scores, examples, fd)


def test_the_task_options_take_effect():
    """Each option changes the run: the decay rule makes other groups, and the loss, the
    augmentation and the rule each move the trained weights."""
    cfg = load_config("test", overrides=OVERRIDES)
    task = load_task(SPEC)
    own = Recipe(cfg, task=task)
    assert own.model.group_ends[0] == 12 * 16 + 16  # first Linear's weight and bias only
    final = counterfactual(cfg, np.ones(48), TARGETS, recipe=own)
    for change in ({"decays": None}, {"loss": None}, {"augment": None}):
        other = Recipe(cfg, task=Task(**{**task.__dict__, **change}))
        assert not np.allclose(counterfactual(cfg, np.ones(48), TARGETS, recipe=other), final,
                               rtol=1e-6, atol=0), change
    # the measurement is the task's: log p(target), not the built-in margin
    values = counterfactual(cfg, np.ones(48), TARGETS, recipe=own)
    assert (values < 0).all()


def test_cli_task_scores_match_finite_differences(tmp_path):
    """`magic --task FILE:FUNCTION` scores against finite differences of `train --task
    --weights` retrainings, then `lds --task` and `smoothness --task` on the same run."""
    sets = set_args(OVERRIDES)
    scores_file = tmp_path / "scores.npy"
    run_module("magic", "--preset", "test", *sets, "--task", SPEC, "--targets", "1,4",
               "--run-dir", tmp_path / "run", "--scores-out", scores_file, "--no-plots")
    scores = np.load(scores_file)
    assert scores.shape == (2, 48)
    # the saved config says which keys the task's own model and data leave unread
    saved = (tmp_path / "run" / "config.toml").read_text().splitlines()
    assert saved[0].startswith("# Not read by this run") and "model.width" in saved[0]
    assert "data.num_train" in saved[0] and "train." not in saved[0]

    def retrain(w):
        import json
        np.save(tmp_path / "w.npy", w)
        out = run_module("train", "--preset", "test", *sets, "--task", SPEC, "--weights",
                         tmp_path / "w.npy", "--measure", "1,4", "--json")
        return json.loads(out.stdout)["measure"]["value"]

    assert_matches_finite_differences(scores, *central_differences(retrain, 48))
    lds = run_module("lds", "--run-dir", tmp_path / "run", "--task", SPEC, "--models", "4",
                     "--keep", "0.9", "--json", "--no-plots")
    assert '"lds_mean"' in lds.stdout
    # the run was trained with --task: without it the store refuses, in one line
    proc = run_module("lds", "--run-dir", tmp_path / "run", "--models", "4", check=False)
    assert proc.returncode == 2
    assert "different model" in proc.stderr and "--task" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("spec, message", [
    ("tasks.py", "is not FILE.py:FUNCTION"),
    ("missing.py:make_task", "does not exist"),
    (f"{TASK_FILE}:nope", "has no function 'nope'"),
])
def test_bad_task_specs_are_one_line_errors(spec, message, tmp_path):
    proc = run_module("magic", "--preset", "test", "--task", spec, "--targets", "0",
                      "--run-dir", tmp_path / "run", check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def _tiny_task(**changes) -> Task:
    task = load_task(SPEC)
    return Task(**{**task.__dict__, **changes})


@pytest.mark.parametrize("changes, error, message", [
    ({"loss": lambda out, y: torch.nn.functional.cross_entropy(out, y)}, ConfigError,
     r"loss returned \(\) for a batch of 2; it must return one value per example"),
    ({"measurements": {"accuracy": lambda out, y: out[:, 0]}}, ConfigError,
     r"measurements\['accuracy'\] must be a function under a kind of loss, margin"),
    ({"data": ArrayData(np.zeros((4, 12)), np.zeros(3), np.zeros((2, 12)), np.zeros(2))},
     DataError, r"must hold the same number \(>= 1\) of examples"),
    ({"data": ArrayData(np.zeros((48, 12)), np.zeros(48, int), np.zeros((2, 5)), np.zeros(2, int))},
     DataError, r"train inputs are \(12,\) per example but test inputs \(5,\)"),
    ({"data": [1, 2, 3]}, DataError, "Task.data must be a fastreplay ArrayData or ImageData"),
    ({"decays": lambda name, p: "yes"}, ConfigError, "decays rule returned str"),
    ({"augment": 3}, ConfigError, "Task.augment must be callable"),
])
def test_tasks_that_cannot_run_are_one_line_errors(changes, error, message):
    cfg = load_config("test", overrides=OVERRIDES)
    with pytest.raises(error, match=message):
        recipe = Recipe(cfg, task=_tiny_task(**changes))
        counterfactual(cfg, np.ones(recipe.num_train), [0], recipe=recipe)


def test_mirroring_non_images_is_refused():
    cfg = load_config("test", overrides=OVERRIDES + ["measure.tta=flip"])
    with pytest.raises(ConfigError, match="measure.tta=flip mirrors images"):
        Recipe(cfg, task=load_task(SPEC))


def test_the_data_keys_of_the_config_do_not_limit_a_tasks_own_data():
    """data.num_train belongs to the built-in data sets: a batch larger than it is fine for a
    task's own data (found on the GPU: the test preset's 256 refused batch 500 of CIFAR-10);
    the batch is checked against the examples the task has."""
    cfg = load_config("test", overrides=OVERRIDES + ["data.num_train=8"])
    assert Recipe(cfg, task=load_task(SPEC)).num_train == 48
    big = load_config("test", overrides=OVERRIDES + ["train.batch_size=64"])
    with pytest.raises(ConfigError, match="train.batch_size=64 exceeds the 48 training examples"):
        Recipe(big, task=load_task(SPEC))
