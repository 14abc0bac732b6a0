"""Bad own-task input fails up front, in one line saying what is wrong and how to fix it.

Each family of bad input, with its exact message: a built module instead of a factory, data of
another type, a task file that is not Python or that exits, non-finite inputs and targets,
labels the built-in cross-entropy cannot take, and what the Recipe's trial of the model
(core/admission.py) finds before any training (shape mismatches, fresh randomness in forward,
non-differentiable losses and measurements, in-place operations that break autograd); then an
integer-id check of `debug --group` files and a never-silent NaN score. The CLI cases run real
`python -m fastreplay.interface.cli` processes (exit 2, one `error:` line, no traceback).
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import SMALL
from test_fallbacks import GAPS
from test_robustness import error_line, fastreplay_all

from fastreplay.config import load_config
from fastreplay.core.measure import measurement_grads, resolve_group
from fastreplay.core.recipe import Recipe
from fastreplay.exceptions import ConfigError, DataError, ReplayError, TrainingError
from fastreplay.interface.api import run_magic
from fastreplay.store import RunStore
from fastreplay.task import ArrayData, Task, load_task, num_test_examples

TASK_FILE = Path(__file__).parent / "tasks" / "tabular_task.py"
SPEC = f"{TASK_FILE}:make_task"
OVERRIDES = SMALL + ["measure.kind=margin"]
FEATURES, CLASSES = 12, 3


def config(*extra: str):
    return load_config("test", overrides=OVERRIDES + list(extra))


def task_with(**changes) -> Task:
    """The tabular test task (own loss and margin measurement) with ``changes``."""
    task = load_task(SPEC)
    return Task(**{**task.__dict__, **changes})


def data_with(**arrays) -> ArrayData:
    """The tabular task's data with some arrays replaced."""
    data = load_task(SPEC).data
    return ArrayData(**{**data.__dict__, **arrays})


def refusal(error, task: Task, *extra: str) -> str:
    """The message of the ``error`` building a Recipe of ``task`` raises (one line)."""
    with pytest.raises(error) as err:
        Recipe(config(*extra), task=task)
    message = str(err.value)
    assert "\n" not in message
    return message


class Net(nn.Module):
    """The tabular task's shape of network, with a hook for what a test puts in its forward."""

    def __init__(self, inside=lambda h: h, features: int = FEATURES):
        super().__init__()
        self.inside = inside
        self.first, self.last = nn.Linear(features, 8), nn.Linear(8, CLASSES)

    def forward(self, x):
        return self.last(self.inside(torch.tanh(self.first(x))))


# --- 1, 2, 6, 7: the task itself, on the command line -----------------------------------------

HEADER = """import numpy as np
import torch.nn as nn
from fastreplay.task import ArrayData, Task

DATA = ArrayData(np.zeros((8, 4), np.float32), np.zeros(8, np.int64),
                 np.zeros((2, 4), np.float32), np.zeros(2, np.int64))
"""
TASK_FILES = {
    "module.py": HEADER + "def make_task():\n    return Task(model=nn.Linear(4, 2), data=DATA)\n",
    "list.py": HEADER + "def make_task():\n"
                        "    return Task(model=lambda: nn.Linear(4, 2), data=[1, 2, 3])\n",
    "exits_on_import.py": HEADER + "import sys\nsys.exit(3)\n",
    "exits_in_make_task.py": HEADER + "def make_task():\n    import sys\n    sys.exit(3)\n",
    "task.toml": "[train]\nepochs = 1\n",
}


def expected_cli_lines(root: Path) -> dict[str, str]:
    def spec(name: str) -> str:
        return f"{root / name}:make_task"
    return {
        "module.py": "error: Task.model must be a zero-argument function building the network, "
                     "not a built Linear; pass model=Linear or model=lambda: Linear(...) (it is "
                     "called under the run's seed, so the initial weights are reproducible)",
        "list.py": "error: Task.data must be a fastreplay ArrayData or ImageData, not list; wrap "
                   "arrays in ArrayData(train_x, train_y, test_x, test_y) or datasets in "
                   "ArrayData.from_datasets(train, test)",
        "exits_on_import.py": f"error: --task file {root / 'exits_on_import.py'} called "
                              "sys.exit(3) while being imported; a task file must define the "
                              "function, not run a program: put the script part under if "
                              "__name__ == '__main__':",
        "exits_in_make_task.py": f"error: --task {spec('exits_in_make_task.py')}: make_task() "
                                 "called sys.exit(3); it must return the Task (raise an "
                                 "exception to report a problem)",
        "task.toml": f"error: --task file {root / 'task.toml'} is not a Python file (.py); give "
                     "FILE.py:FUNCTION, a zero-argument function returning a fastreplay.Task, "
                     "e.g. --task examples/digits_mlp.py:make_task (configs go to --config)",
    }


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """`magic --task FILE:make_task` on every bad task file, in real processes, four at a time."""
    root = tmp_path_factory.mktemp("tasks")
    for name, text in TASK_FILES.items():
        (root / name).write_text(text)
    names = list(TASK_FILES)
    calls = [("magic", "--preset", "test", "--task", f"{root / n}:make_task", "--targets", "0",
              "--run-dir", root / f"run-{n}", "--no-plots") for n in names]
    out = {}
    for lo in range(0, len(calls), 4):
        out.update(zip(names[lo:lo + 4], fastreplay_all(*calls[lo:lo + 4], timeout=300)))
    return root, out


@pytest.mark.parametrize("name", list(TASK_FILES))
def test_bad_task_files_are_one_line_errors_on_the_command_line(name, cli_results):
    root, results = cli_results
    assert error_line(results[name]) == expected_cli_lines(root)[name]


def test_test_targets_without_a_length_are_refused_before_magic_counts_them():
    """`magic` range-checks --targets with the number of test examples before any Recipe
    exists (cli.magic reads it through task.num_test_examples)."""
    data = load_task(SPEC).data
    with pytest.raises(DataError) as err:
        num_test_examples(task_with(data=data_with(test_y=5)))
    assert str(err.value) == ("ArrayData.test_y (int) has no length; give an array with one "
                              "target per test example")
    assert num_test_examples(task_with()) == 8


def test_a_built_module_is_refused_from_python_too():
    assert refusal(ConfigError, task_with(model=Net())) == (
        "Task.model must be a zero-argument function building the network, not a built Net; "
        "pass model=Net or model=lambda: Net(...) (it is called under the run's seed, so the "
        "initial weights are reproducible)")


# --- 3: non-finite inputs and targets ------------------------------------------------------------

def _poisoned(array, example: int, value: float):
    out = np.array(array, dtype=np.float64)
    out[example, ...] = value
    return out


@pytest.mark.parametrize("arrays, extra, message", [
    (lambda d: {"train_x": _poisoned(d.train_x, 7, np.nan)}, [],
     "ArrayData.train_x holds nan in example 7 (as float64); inputs must be finite"),
    (lambda d: {"test_x": _poisoned(d.test_x, 3, -np.inf)}, [],
     "ArrayData.test_x holds -inf in example 3 (as float64); inputs must be finite"),
    # finite in float64, infinite in the run's float32
    (lambda d: {"train_x": _poisoned(d.train_x, 5, 1e300)}, ["train.dtype=float32"],
     "ArrayData.train_x holds inf in example 5 (as float32); inputs must be finite"),
    (lambda d: {"train_y": _poisoned(d.train_y, 2, np.nan)}, [],
     "ArrayData.train_y holds nan in example 2 (as float64); targets must be finite"),
])
def test_non_finite_inputs_and_targets_are_refused_with_their_example(arrays, extra, message):
    data = load_task(SPEC).data
    got = refusal(DataError, task_with(data=data_with(**arrays(data))), *extra)
    assert got == (message + ": drop or fix that example (e.g. impute NaNs, clip huge values) "
                   "before building the ArrayData")


# --- 4: labels for the built-in cross-entropy and measurements ----------------------------------

def _relabelled(labels, example: int, label):
    out = np.array(labels)
    out[example] = label
    return out


LOSS_FIX = "fix the labels or the model's output size, or give Task.loss for other targets"


@pytest.mark.parametrize("changes, message", [
    (lambda d: {"loss": None, "data": data_with(train_y=d.train_y.astype(np.float32))},
     "train_y holds floating-point labels; the built-in cross-entropy loss needs integer class "
     "labels: cast them, e.g. train_y.astype(np.int64), or give Task.loss for other targets"),
    (lambda d: {"loss": None, "data": data_with(train_y=_relabelled(d.train_y, 9, -1))},
     "train_y holds label -1 at example 9; the built-in cross-entropy loss needs class labels in "
     f"[0, 3) (the model has 3 outputs): {LOSS_FIX}"),
    (lambda d: {"loss": None, "data": data_with(train_y=_relabelled(d.train_y, 40, 3))},
     "train_y holds label 3 at example 40; the built-in cross-entropy loss needs class labels in "
     f"[0, 3) (the model has 3 outputs): {LOSS_FIX}"),
    # the task's own loss, the built-in margin measurement: the test labels are checked
    (lambda d: {"measurements": {}, "data": data_with(test_y=_relabelled(d.test_y, 6, 7))},
     "test_y holds label 7 at example 6; the built-in 'margin' measurement needs class labels in "
     "[0, 3) (the model has 3 outputs): fix the labels or the model's output size, or give "
     "Task.measurements['margin'] for other targets"),
])
def test_labels_the_built_in_cross_entropy_cannot_take_are_refused(changes, message):
    """Checked over the whole split before any label reaches the loss (an out-of-range label
    is an IndexError on the CPU and a device-side assertion on CUDA)."""
    data = load_task(SPEC).data
    assert refusal(DataError, task_with(**changes(data))) == message


def test_the_task_s_own_loss_takes_any_targets():
    """Float targets and labels past the outputs are fine where the task brings the loss and
    measurement that read them (a regression, say)."""
    data = load_task(SPEC).data

    def regression(outputs, targets):
        return (outputs[:, 0] - targets) ** 2
    Recipe(config(), task=task_with(loss=regression, measurements={"margin": regression},
                                    data=data_with(train_y=data.train_y * 10.0,
                                                   test_y=data.test_y * 10.0)))


# --- 5: the trial of the model before training -------------------------------------------------

@pytest.mark.parametrize("changes, message", [
    ({"model": lambda: Net(features=10)},
     "the model failed on a training batch of inputs (2, 12) (RuntimeError: mat1 and mat2 shapes "
     "cannot be multiplied (2x12 and 10x8)); make the model's input size match the data"),
    ({"loss": lambda outputs, y: outputs[:, 5]},
     "the task's loss failed on outputs (2, 3) and targets (2,) (IndexError: index 5 is out of "
     "bounds for dimension 1 with size 3); make it take the model's outputs and the targets and "
     "return one value per example"),
    ({"measurements": {"margin": lambda outputs, y: outputs[:, 5]}},
     "the task's 'margin' measurement failed on outputs (2, 3) and targets (2,) (IndexError: "
     "index 5 is out of bounds for dimension 1 with size 3); make it take the model's outputs "
     "and the targets and return one value per example"),
    # the task brings a loss measurement only: measure.kind=margin falls back to the built-in
    # one, which cannot read sequence outputs
    ({"model": lambda: nn.Sequential(Net(), nn.Unflatten(1, (1, CLASSES))),
      "loss": lambda outputs, y: F.cross_entropy(outputs[:, 0], y, reduction="none"),
      "measurements": {"loss": lambda outputs, y: F.cross_entropy(outputs[:, 0], y,
                                                                  reduction="none")}},
     "the built-in 'margin' measurement failed on outputs (2, 1, 3) and targets (2,) "
     "(RuntimeError: Index tensor must have the same number of dimensions as input tensor); "
     "give Task.measurements['margin'] for outputs or targets that are not class logits and "
     "labels"),
])
def test_shape_mismatches_are_found_before_training(changes, message):
    assert refusal(ConfigError, task_with(**changes)) == message


RANDOM = ("the model Net draws fresh randomness in forward (two identical training forwards "
          "differ: functional dropout, torch.randn, ...); exact replay needs the same output "
          "every time: remove it or make it a pure function of the inputs")


@pytest.mark.parametrize("inside", [
    lambda h: F.dropout(h, 0.1, training=True),
    lambda h: h + 1e-3 * torch.randn_like(h),
])
def test_fresh_randomness_in_forward_is_found_before_training(inside):
    """Today's replay would blame the machine after the whole training (the rebuilt steps do
    not reproduce the stored states); the trial names the model."""
    assert refusal(ConfigError, task_with(model=lambda: Net(inside))) == RANDOM


def test_fresh_randomness_in_the_augmentation_is_found_before_training():
    def noisy(x, seed, step):
        return x + 0.1 * torch.randn_like(x)
    assert refusal(ConfigError, task_with(augment=noisy)) == (
        "the task's augment draws fresh randomness (two calls with the same seed and step "
        "differ); exact replay needs the same batch every time: draw from a generator seeded by "
        "(seed, step), e.g. torch.Generator().manual_seed(seed * 100003 + step)")


def _no_gradient(what: str, fix: str) -> str:
    return (f"no gradient flows from the model's weights to {what} (argmax, .item(), "
            f"torch.no_grad or .detach() on the way); exact replay needs that gradient: {fix}")


def _margin_by_item(outputs, y):
    return torch.tensor([outputs[i, int(y[i])].item() for i in range(len(y))],
                        dtype=outputs.dtype)


def _loss_without_grad(outputs, y):
    with torch.no_grad():
        return F.cross_entropy(outputs, y, reduction="none")


@pytest.mark.parametrize("changes, message", [
    ({"model": lambda: nn.Sequential(Net(), Argmax())},
     _no_gradient("the model's outputs", "return the outputs themselves (logits, scores), not a "
                  "function of them such as argmax")),
    ({"loss": _loss_without_grad},
     _no_gradient("the training loss", "compute it from the outputs with differentiable "
                  "operations")),
    ({"measurements": {"margin": _margin_by_item}},
     _no_gradient("the 'margin' measurement", "compute it from the outputs with differentiable "
                  "operations")),
    ({"measurements": {"margin": lambda outputs, y: (outputs.argmax(1) == y).to(outputs.dtype)}},
     _no_gradient("the 'margin' measurement", "compute it from the outputs with differentiable "
                  "operations")),
])
def test_what_has_no_gradient_is_found_before_training(changes, message):
    assert refusal(ConfigError, task_with(**changes)) == message


class Argmax(nn.Module):
    def forward(self, logits):
        return logits.argmax(-1)


def _doubled_sigmoid(h):
    y = torch.sigmoid(h)
    y.mul_(2)
    return y


class _SquareWithInPlaceBackward(torch.autograd.Function):
    """x ** 2 whose backward overwrites, in place, a tensor its own graph saved: the gradient is
    right (training runs), the second derivative the replay takes fails."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        twice = 2 * x
        out = grad * twice
        twice.mul_(1.0)
        return out


def _in_place_measurement(outputs, y):
    logp = F.log_softmax(outputs, 1)
    logp.mul_(1.0)
    return logp.gather(1, y[:, None]).squeeze(1)


INPLACE_FIX = ("use the out-of-place form in the model, loss and measurement (x = x + 1, not "
               "x += 1 or x.add_(1); nn.ReLU(inplace=False))")


@pytest.mark.parametrize("changes, what, saved", [
    ({"model": lambda: Net(_doubled_sigmoid)}, "the training loss's gradient",
     "[torch.DoubleTensor [2, 8]], which is output 0 of Sigmoid"),
    ({"model": lambda: Net(_SquareWithInPlaceBackward.apply)},
     "the training loss's second derivative (a Hessian-vector product)",
     "[torch.DoubleTensor [2, 8]], which is output 0 of Mul"),
    ({"measurements": {"margin": _in_place_measurement}}, "the 'margin' measurement's gradient",
     "[torch.DoubleTensor [2, 3]], which is output 0 of LogSoftmax"),
])
def test_in_place_operations_that_break_autograd_are_found_before_training(changes, what, saved):
    message = refusal(ConfigError, task_with(**changes))
    assert message.startswith(f"computing {what} failed (RuntimeError: one of the variables "
                              "needed for gradient computation has been modified by an inplace "
                              f"operation: {saved}"), message
    assert message.endswith(f"...); {INPLACE_FIX}")


def test_an_in_place_operation_only_the_second_derivative_meets_used_to_fail_in_the_replay(
        tmp_path, monkeypatch):
    """Training runs with it (first derivatives only); the replay's double backward met it as
    an autograd traceback after the whole training. The trial finds it before training."""
    task = task_with(model=lambda: Net(_SquareWithInPlaceBackward.apply))
    monkeypatch.setattr("fastreplay.core.admission.admit", lambda recipe: None)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        run_magic(config(), [0], tmp_path, plots=False, task=task)


class _Through(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("gap", list(GAPS))
def test_models_the_replay_supports_through_its_fallbacks_pass_the_trial(gap):
    """Forward-mode AD and vmap gaps are the replay's to route around (test_fallbacks.py): the
    trial takes the derivatives every mode falls back to, never a jvp or a vmap."""
    Recipe(config(), task=task_with(model=lambda: nn.Sequential(Net(), _Through(GAPS[gap]))))


class _DrawsButIgnoresIt(nn.Module):
    """Draws from every global generator in forward, and multiplies the draws by 0: a pure
    function of its inputs that the trial must accept and leave no draw behind of."""

    def __init__(self):
        super().__init__()
        self.net = Net()

    def forward(self, x):
        noise = torch.rand(1, dtype=x.dtype) + np.random.rand() + random.random()
        return self.net(x) + 0 * noise


def _generators() -> tuple:
    return torch.random.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


@pytest.mark.parametrize("factory", [_DrawsButIgnoresIt, lambda: Net(lambda h: F.dropout(h, 0.1))])
def test_the_trial_changes_no_state(factory, monkeypatch):
    """Generators, initial weights and statistics as without the trial, also when it refuses."""
    def built():
        np.random.seed(1)
        random.seed(1)
        try:
            recipe = Recipe(config(), task=task_with(model=factory))
        except ConfigError:
            recipe = None
        return recipe, _generators()

    tried, after_trial = built()
    monkeypatch.setattr("fastreplay.core.admission.admit", lambda recipe: None)
    untried, after_build = built()
    assert torch.equal(after_trial[0], after_build[0])
    assert np.array_equal(after_trial[1], after_build[1]) and after_trial[2] == after_build[2]
    if tried is not None:
        assert torch.equal(tried.model.theta0, untried.model.theta0)
        assert torch.equal(tried.model.buffers0, untried.model.buffers0)


def test_the_built_in_model_passes_the_trial_unchanged(monkeypatch):
    cfg = load_config("test", overrides=SMALL)
    tried = Recipe(cfg)
    rng = torch.random.get_rng_state()
    monkeypatch.setattr("fastreplay.core.admission.admit", lambda recipe: None)
    untried = Recipe(cfg)
    assert torch.equal(rng, torch.random.get_rng_state())
    assert torch.equal(tried.model.theta0, untried.model.theta0)
    assert torch.equal(tried.model.buffers0, untried.model.buffers0)


# --- 8: debug --group files of ids --------------------------------------------------------------

@pytest.mark.parametrize("ids, message", [
    (np.array([0.0, 2.7]), "holds float64 values, not test ids; save integer ids, e.g. "
                           "np.save(f, ids.astype(np.int64))"),
    (np.array([True, False, True]), "holds bool values, not test ids; save integer ids, e.g. "
                                    "np.save(f, np.flatnonzero(mask)) for a mask"),
])
def test_group_files_of_non_integers_are_refused(ids, message, tmp_path):
    """int() would have truncated 2.7 to 2 and read a mask as ids 1, 0, 1: another group."""
    recipe = Recipe(config(), task=load_task(SPEC))
    path = tmp_path / "group.npy"
    np.save(path, ids)
    with pytest.raises(ConfigError) as err:
        resolve_group(str(path), recipe)
    assert str(err.value) == f"--group file {path} {message}"
    np.save(path, np.array([2, 0]))
    assert resolve_group(str(path), recipe)[1] == [0, 2]


# --- 9: never a silent NaN score ----------------------------------------------------------------

def _log_of_zero(outputs, y):
    """-inf at every weight: the log of a ReLU that stays at 0."""
    return torch.log(torch.relu(outputs[:, 0] - 1e6))


def _finite_with_nan_gradient(outputs, y):
    """log p(target) plus 0 * sqrt(0): finite, but its gradient is NaN (0 * inf)."""
    return (F.log_softmax(outputs, 1).gather(1, y[:, None]).squeeze(1)
            + 0 * torch.sqrt(outputs[:, 0] - outputs[:, 0].detach()))


class _NaNSecondDerivative(torch.autograd.Function):
    """The identity, whose backward multiplies by 1 + 0 * sqrt(x - x): first derivatives are
    exact (training runs), the second derivative is NaN."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 + 0 * torch.sqrt(x - x))


@pytest.mark.parametrize("changes, error, message", [
    ({"measurements": {"margin": _log_of_zero}}, TrainingError,
     "the margin measurement of test 0 is -inf at the end of training, so its scores would be "
     "NaN; check the measurement at the trained weights (a log or division of 0, say), or score "
     "other targets (no scores were stored)"),
    ({"measurements": {"margin": _finite_with_nan_gradient}}, TrainingError,
     "the margin measurement of test 0 has a non-finite gradient at the end of training, so its "
     "scores would be NaN; check the measurement at the trained weights (a log or division of 0, "
     "say), or score other targets (no scores were stored)"),
    ({"model": lambda: Net(_NaNSecondDerivative.apply)}, ReplayError,
     "the scores of test 0 are not finite (nan for training example 0): the reverse pass met a "
     "non-finite derivative of the training loss; use a model and loss with finite second "
     "derivatives (no sqrt, log or division near 0) or a smaller train.lr (no scores were "
     "stored)"),
])
def test_a_non_finite_measurement_or_score_is_an_error_and_nothing_is_stored(changes, error,
                                                                             message, tmp_path):
    with pytest.raises(error) as err:
        run_magic(config(), [0, 1], tmp_path, plots=False, task=task_with(**changes))
    assert str(err.value) == message
    store = RunStore.open(tmp_path / "run.zarr", "r")
    assert store.status == "trained" and not store.score_names()
    store.close()


def test_non_finite_trained_weights_are_named():
    recipe = Recipe(config(), task=load_task(SPEC))
    theta = recipe.model.theta0.clone()
    theta[3] = float("nan")
    with pytest.raises(TrainingError) as err:
        measurement_grads(recipe, theta, recipe.model.buffers0, [4, 2], "margin")
    assert str(err.value) == (
        "the margin measurement of test 4 is nan at the end of training, so its scores would be "
        "NaN; the trained weights are not finite (training diverged at its last steps: lower "
        "train.lr), or score other targets (no scores were stored)")
