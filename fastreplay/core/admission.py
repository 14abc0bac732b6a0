"""What a user's model must pass before training: one trial of the whole task on a few examples.

A model, loss or measurement that cannot be trained and replayed exactly used to show it late:
a shape mismatch as a traceback at the first step, fresh randomness in forward (functional
dropout, torch.randn) as a replay that blamed the machine after the whole training, a measurement
built on argmax as an autograd traceback in the replay, an in-place operation as a traceback in
the middle of the reverse pass. :func:`admit` finds each before anything is trained, in one
line saying what to change.

It runs from ``Recipe.__init__`` for built-in and own tasks alike, at the initial weights, on
``TRIAL_EXAMPLES`` training examples (as the first step gathers and augments them) and as many
test examples: the training loss with one backward of its weighted mean and one Hessian-vector
product by double backward (what replay.hvp=reverse computes, the mode every other one falls
back to: forward-mode AD and vmap gaps are not refused here), and each measurement the run can
take with its gradient. It changes nothing: it works on copies of the initial weights and
statistics (FlatModel.forward is a pure function of them), and restores the random number
generators it might advance.
"""
from __future__ import annotations

import contextlib
import random
from typing import Callable

import numpy as np
import torch

from ..exceptions import ConfigError, DataError, FastReplayError
from .func_limits import first_line
from .measure import measurement_values
from .recipe import Recipe

TRIAL_EXAMPLES = 2
"""Examples of each split the trial runs on: two, so that BatchNorm has a batch statistic."""

_INPLACE_WORDS = ("inplace", "in-place")
_INPLACE_FIX = ("use the out-of-place form in the model, loss and measurement (x = x + 1, not "
                "x += 1 or x.add_(1); nn.ReLU(inplace=False))")


def admit(recipe: Recipe) -> None:
    """Refuse, with a one-line ConfigError or DataError, a task whose model, loss or measurements
    could not be trained and replayed exactly; leaves every state as it was."""
    with _generators_untouched(recipe.device):
        theta = recipe.model.theta0.detach().clone().requires_grad_(True)
        buffers = recipe.model.buffers0.detach().clone()
        x, y, ids = _training_batch(recipe)
        with recipe.randomness(0, ids):  # the masks of the first step's dropout, if any
            outputs = _check_pure_forward(recipe, theta, buffers, x)
            if recipe.task.loss is None:
                _check_class_labels(recipe.data.train_y, "train", outputs, "the built-in "
                                    "cross-entropy loss", "Task.loss")
            _check_training_derivatives(recipe, theta, buffers, x, y)
        _check_measurements(recipe, theta, buffers)


@contextlib.contextmanager
def _generators_untouched(device: torch.device):
    """torch's (CPU and this CUDA device's), NumPy's and Python's global generators as they
    were: a trial that drew from them would shift every draw after it (a model built later,
    a user's own code)."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)


def _attempt(fn: Callable, failed: str, fix: str):
    """``fn()``, any exception of the user's code as one ConfigError: what ``failed``, the
    exception's type and first line, and the ``fix``. fastreplay's own errors pass as they are."""
    try:
        return fn()
    except FastReplayError:
        raise
    except Exception as exc:
        raise ConfigError(f"{failed} ({type(exc).__name__}: {first_line(exc, 160)}); {fix}") \
            from None


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def _training_batch(recipe: Recipe):
    """(x, y, ids) of the first step's first examples, gathered and augmented as that step does
    it, twice: an augmentation must give the same batch for the same (seed, step)."""
    idx = recipe.plan.indices[0][:TRIAL_EXAMPLES]
    inputs = recipe.data.train_x[idx]

    def batch():
        return recipe.data.train_batch(idx, 0)
    what = f"the task's augment failed on a training batch of inputs {_shape(inputs)}"
    fix = "make it return the batch, same shape, as a pure function of (batch, seed, step)"
    x = _attempt(batch, what, fix)
    if recipe.task.augment is not None and not _same(x, _attempt(batch, what, fix)):
        raise ConfigError("the task's augment draws fresh randomness (two calls with the same "
                          "seed and step differ); exact replay needs the same batch every time: "
                          "draw from a generator seeded by (seed, step), e.g. torch.Generator()"
                          ".manual_seed(seed * 100003 + step)")
    return x, recipe.data.train_y[idx], idx


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal values (NaN where the other has NaN too)."""
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _check_pure_forward(recipe: Recipe, theta, buffers, x) -> torch.Tensor:
    """The training-mode outputs on ``x``, refused unless the model runs on it and gives the
    same outputs and statistics twice: the replay recomputes every step and must land on the
    same bits, so a forward drawing fresh random numbers cannot be replayed."""
    what = f"the model failed on a training batch of inputs {_shape(x)}"
    fix = "make the model's input size match the data"

    def forward():
        with torch.no_grad():
            return recipe.model.forward(theta, buffers, x, train=True)
    _attempt(forward, what, fix)  # a process's first CPU matmuls can round differently (seen
    # with GPT-2: 1 fresh process in 20): the trial compares the two calls after it
    first, stats = _attempt(forward, what, fix)
    again, stats_again = _attempt(forward, what, fix)
    if not (_same(first, again) and _same(stats, stats_again)):
        name = type(recipe.model.module).__name__
        raise ConfigError(f"the model {name} draws fresh randomness in forward (two identical "
                          "training forwards differ: functional dropout, torch.randn, ...); exact "
                          "replay needs the same output every time: remove it or make it a pure "
                          "function of the inputs")
    return first


def _check_class_labels(labels: torch.Tensor, split: str, outputs: torch.Tensor, user: str,
                        field: str) -> None:
    """Every label of ``split`` a class of the model's ``outputs``, as the built-in cross-entropy
    and margin (``user``) need: integers in [0, classes). Checked over the whole split, before
    any of them reaches the loss (out-of-range labels are an assertion inside a CUDA kernel).
    Floating targets shaped like the outputs (class probabilities) go on to the trial; labels
    laid out otherwise than the outputs are left to it too (its shape error says more)."""
    per_example = tuple(outputs.shape[1:])
    if labels.is_floating_point():
        if tuple(labels.shape[1:]) == per_example:
            return
        raise DataError(f"{split}_y holds floating-point labels; {user} needs "
                        f"integer class labels: cast them, e.g. {split}_y.astype(np.int64), or "
                        f"give {field} for other targets")
    laid_out = outputs.dim() >= 2 and tuple(labels.shape[1:]) == per_example[1:]
    classes = outputs.shape[1] if laid_out else None
    bad = labels < 0 if classes is None else (labels < 0) | (labels >= classes)
    if not bool(bad.any()):
        return
    flat = int(bad.reshape(-1).nonzero()[0, 0])
    example, label = flat // max(1, labels[0].numel()), int(labels.reshape(-1)[flat])
    allowed = ">= 0" if classes is None else f"in [0, {classes}) (the model has {classes} outputs)"
    raise DataError(f"{split}_y holds label {label} at example {example}; {user} needs class "
                    f"labels {allowed}: fix the labels or the model's output size, or give "
                    f"{field} for other targets")


def _check_training_derivatives(recipe: Recipe, theta, buffers, x, y) -> None:
    """The training loss runs on the model's outputs, gives one differentiable value per
    example, and has the derivatives the step and the replay take: the gradient of its weighted
    mean, and a Hessian-vector product through that gradient (with the statistics' term)."""
    what = f"the model failed on a training batch of inputs {_shape(x)}"
    outputs, new_buffers = _attempt(lambda: recipe.model.forward(theta, buffers, x, train=True),
                                    what, "make the model's input size match the data")
    _require_gradient(outputs, "the model's outputs", "return the outputs themselves (logits, "
                      "scores), not a function of them such as argmax")
    loss = "the task's loss" if recipe.task.loss is not None else "the built-in cross-entropy loss"
    fix = ("make it take the model's outputs and the targets and return one value per example"
           if recipe.task.loss is not None else
           "give Task.loss for outputs or targets that are not class logits and labels")
    losses = _attempt(lambda: recipe.loss_values(outputs, y),
                      f"{loss} failed on outputs {_shape(outputs)} and targets {_shape(y)}", fix)
    _require_gradient(losses, "the training loss", "compute it from the outputs with "
                      "differentiable operations")
    w = torch.ones(x.shape[0], dtype=recipe.dtype, device=recipe.device, requires_grad=True)
    (grad,) = _differentiate(lambda: torch.autograd.grad((w * losses).sum() / x.shape[0], theta,
                                                         create_graph=True),
                             "the training loss's gradient")
    direction = (grad * grad.detach()).sum()
    if new_buffers.numel():
        direction = direction + new_buffers.sum()
    _differentiate(lambda: torch.autograd.grad(direction, (theta, w), materialize_grads=True),
                   "the training loss's second derivative (a Hessian-vector product)")


def _check_measurements(recipe: Recipe, theta, buffers) -> None:
    """Each measurement the run can take (measure.kind, and the task's own) runs on the
    eval-mode outputs of test examples, one differentiable value each, with its gradient (w.r.t.
    the weights and the statistics, as the replay starts from)."""
    idx = torch.arange(min(TRIAL_EXAMPLES, recipe.data.num_test), device=recipe.device)
    x, y = recipe.data.test_batch(idx), recipe.data.test_y[idx]
    stats = buffers.detach().requires_grad_(buffers.numel() > 0)
    inputs = (theta, stats) if stats.requires_grad else (theta,)
    outputs, _ = _attempt(lambda: recipe.model.forward(theta, stats, x, train=False),
                          f"the model failed on a test batch of inputs {_shape(x)}",
                          "make the model's input size match the data")
    for kind in sorted({recipe.cfg.measure.kind, *recipe.task.measurements}):
        own = kind in recipe.task.measurements
        name = f"the task's {kind!r} measurement" if own else f"the built-in {kind!r} measurement"
        if not own:
            _check_class_labels(recipe.data.test_y, "test", outputs, name,
                                f"Task.measurements[{kind!r}]")
        fix = ("make it take the model's outputs and the targets and return one value per "
               "example" if own else f"give Task.measurements[{kind!r}] for outputs or targets "
               "that are not class logits and labels")
        values = _attempt(lambda: measurement_values(recipe, outputs, y, kind),
                          f"{name} failed on outputs {_shape(outputs)} and targets {_shape(y)}",
                          fix)
        _require_gradient(values, f"the {kind!r} measurement", "compute it from the outputs "
                          "with differentiable operations")
        _differentiate(lambda: torch.autograd.grad(values.sum(), inputs, retain_graph=True),
                       f"the {kind!r} measurement's gradient")


def _require_gradient(t: torch.Tensor, what: str, fix: str) -> None:
    """A gradient reaches ``what`` from the weights: the scores are made of its derivatives."""
    if not (t.is_floating_point() and t.requires_grad):
        raise ConfigError(f"no gradient flows from the model's weights to {what} (argmax, "
                          ".item(), torch.no_grad or .detach() on the way); exact replay needs "
                          f"that gradient: {fix}")


def _differentiate(fn: Callable, what: str):
    """``fn()`` (an autograd call), its failures as one ConfigError: an in-place operation
    that overwrote a tensor autograd saved gets the out-of-place advice."""
    try:
        return fn()
    except RuntimeError as exc:
        message = first_line(exc, 160)
        fix = (_INPLACE_FIX if any(w in str(exc).lower() for w in _INPLACE_WORDS) else
               "exact replay needs first and second derivatives of the training loss and the "
               "gradient of the measurement: use operations torch can differentiate twice")
        raise ConfigError(f"computing {what} failed (RuntimeError: {message}); {fix}") from None
