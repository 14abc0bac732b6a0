"""What a user brings to be attributed: a :class:`Task` (model, data, loss, measurements,
augmentation, weight-decay rule), in the manner of kronfluence's ``Task``.

The built-in presets are tasks too (:func:`builtin_task`): a Recipe always runs a Task, so a
user's network and the built-in ResNet-9 go through one code path. Everything here is a pure
function of its inputs, because the replay recomputes every training step bit for bit and
differentiates it: a loss, a measurement or an augmentation that drew fresh randomness or read
global state would make the scores the derivative of some other run.
"""
from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .exceptions import ConfigError, DataError

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(outputs, targets) -> one value per example, shape (B,)."""
Augment = Callable[[torch.Tensor, int, int], torch.Tensor]
"""(batch of inputs, seed, step) -> the augmented batch, same shape: a pure function of them
(draw any randomness from a generator seeded with (seed, step), never from global state)."""
DecayRule = Callable[[str, nn.Parameter], bool]
"""(parameter name, parameter) -> True when the parameter is weight-decayed (group "decay", lr
x1), False for the no-decay group (lr x train.bias_lr_scale)."""
Show = Callable[[torch.Tensor], np.ndarray]
"""One example's inputs (on the CPU) -> an image (H, W) or (H, W, 3) for the influence plots."""

MEASUREMENT_KINDS = ("loss", "margin")
"""A measurement is registered under a kind, which says its orientation: "loss" (lower is
better: a helpful example has a negative score) or "margin" (higher is better)."""


@dataclass(frozen=True)
class ArrayData:
    """Examples held as arrays (numpy or torch), each example's index its id: inputs ``*_x``
    (N, ...) of any numeric dtype (floating ones are cast to the run's dtype; integer ones, such
    as token ids, are kept) and targets ``*_y`` (N, ...) that the task's loss and measurements
    take (class labels for the built-in ones). Nothing is normalised or augmented for you."""
    train_x: Any
    train_y: Any
    test_x: Any
    test_y: Any
    class_names: Optional[tuple] = None

    @classmethod
    def from_datasets(cls, train, test, class_names=None) -> "ArrayData":
        """From map-style datasets (``torch.utils.data.Dataset``: ``len`` and ``ds[i] -> (x, y)``),
        stacked into memory once: the index in ``train`` is the example's id in the scores."""
        return cls(*_stack(train, "train"), *_stack(test, "test"), class_names)


def _stack(dataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        items = [dataset[i] for i in range(len(dataset))]
        xs, ys = zip(*items)
        return (torch.stack([torch.as_tensor(x) for x in xs]),
                torch.stack([torch.as_tensor(y) for y in ys]))
    except Exception as exc:
        raise DataError(f"the {split} dataset could not be stacked into arrays ({type(exc).__name__}: "
                        f"{str(exc)[:120]}); each item must be an (x, y) pair of equal-shaped "
                        "tensors or numbers") from None


@dataclass(frozen=True)
class Task:
    """A user's training problem. Only ``model`` and ``data`` are required.

    model: zero-argument callable building the ``nn.Module`` (stock layers; BatchNorm layers
        are carried exactly, see models.prepare_module). Called under the run's seed.
    data: ``ArrayData`` (any inputs) or ``data.ImageData`` (uint8 images, normalised per channel
        and, with ``data.augment``, cropped and flipped like the built-in presets).
    loss: per-example training loss (outputs, targets) -> (B,); default cross-entropy with
        ``train.label_smoothing``. The step minimises the data-weighted mean of it.
    measurements: {kind: fn} with kind "loss" or "margin" (``measure.kind`` picks one): the
        function of the test outputs and targets whose derivative the scores are; kinds not
        given fall back to the built-in cross-entropy and margin.
    augment: applied to each training batch after it is gathered (images: after normalising);
        default none for ArrayData, the built-in crop and flip for ImageData.
    decays: which parameters get weight decay (and lr x1) rather than none (and lr x
        ``train.bias_lr_scale``); default: tensors with two or more dimensions.
    show: renders one example for the influence plots (ArrayData without it: no plots).
    """
    model: Optional[Callable[[], nn.Module]]
    data: Any
    loss: Optional[Loss] = None
    measurements: Mapping[str, Loss] = field(default_factory=dict)
    augment: Optional[Augment] = None
    decays: Optional[DecayRule] = None
    show: Optional[Show] = None


def builtin_task(cfg, download: bool = False, data=None, model_factory=None) -> Task:
    """The task of a preset: the built-in ``model.name`` (or ``model_factory``) on ``data.name``
    (or the given ImageData), cross-entropy, the built-in measurements and augmentation."""
    from .data import load_data
    return Task(model=model_factory, data=load_data(cfg, download) if data is None else data)


IMAGE_DATA_KEYS = ("num_classes", "augment", "crop_padding")
"""The data.* keys a task's own ImageData still reads (label range, built-in augmentation)."""


def unused_config_keys(task: Task, own_data: bool, cfg) -> list[str]:
    """The config keys a run of ``task`` never reads, so that its saved config can say so: the
    built-in network's model.* when the task builds its own model, the built-in data set's data.*
    when it brings its own data (ImageData still reads IMAGE_DATA_KEYS)."""
    from .data import ImageData
    unused = []
    if task.model is not None:
        unused += [f"model.{k}" for k in cfg.to_dict()["model"]]
    if own_data:
        kept = IMAGE_DATA_KEYS if isinstance(task.data, ImageData) else ()
        unused += [f"data.{k}" for k in cfg.to_dict()["data"] if k not in kept]
    return unused


def cross_entropy(label_smoothing: float) -> Loss:
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction="none", label_smoothing=label_smoothing)
    return loss


def builtin_measurement(kind: str) -> Loss:
    """Cross-entropy of the target ("loss") or its logit minus the logsumexp of the others
    ("margin")."""
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, labels, reduction="none")

    def margin(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        correct = logits.gather(1, labels[:, None]).squeeze(1)
        others = logits.scatter(1, labels[:, None], float("-inf"))
        return correct - torch.logsumexp(others, dim=1)
    return {"loss": loss, "margin": margin}[kind]


def check_task(task: Task) -> Task:
    """One-line ConfigErrors for a task that could not run, before anything is trained."""
    if not isinstance(task, Task):
        raise ConfigError(f"a task must be a fastreplay.Task, not {type(task).__name__}; build "
                          "one with Task(model=..., data=...)")
    for name in ("model", "loss", "augment", "decays", "show"):
        value = getattr(task, name)
        if value is not None and not callable(value):
            raise ConfigError(f"Task.{name} must be callable, not {type(value).__name__}")
    if isinstance(task.model, nn.Module):
        # A built network would be shared by every Recipe (training, replay, each LDS model)
        # and its initial weights drawn outside the run's seed: the factory is called anew.
        name = type(task.model).__name__
        raise ConfigError(f"Task.model must be a zero-argument function building the network, "
                          f"not a built {name}; pass model={name} or model=lambda: {name}(...) "
                          "(it is called under the run's seed, so the initial weights are "
                          "reproducible)")
    check_data_type(task.data)
    if not isinstance(task.measurements, Mapping):
        raise ConfigError("Task.measurements must be a dict {kind: function} with kind "
                          f"{' or '.join(MEASUREMENT_KINDS)}")
    for kind, fn in task.measurements.items():
        if kind not in MEASUREMENT_KINDS or not callable(fn):
            raise ConfigError(f"Task.measurements[{kind!r}] must be a function under a kind of "
                              f"{', '.join(MEASUREMENT_KINDS)} (loss: lower is better, margin: "
                              "higher is better)")
    return task


def check_data_type(data) -> None:
    """A DataError unless ``data`` is one of the data classes a Recipe can put on the device
    (checked with the task, before anything reads ``data.test_y``)."""
    from .data import ImageData
    if not isinstance(data, (ArrayData, ImageData)):
        raise DataError(f"Task.data must be a fastreplay ArrayData or ImageData, not "
                        f"{type(data).__name__}; wrap arrays in ArrayData(train_x, train_y, "
                        "test_x, test_y) or datasets in ArrayData.from_datasets(train, test)")


def num_test_examples(task: Task) -> int:
    """How many test examples the task's data hold, read before they go to the device (the CLI
    range-checks --targets with it); a DataError where ``test_y`` has no length."""
    try:
        return len(task.data.test_y)
    except TypeError:
        raise DataError(f"{type(task.data).__name__}.test_y ({type(task.data.test_y).__name__}) "
                        "has no length; give an array with one target per test example") from None


def per_example(values: torch.Tensor, batch: int, what: str) -> torch.Tensor:
    """``values`` checked to hold one number per example of a batch of ``batch``."""
    if not isinstance(values, torch.Tensor) or tuple(values.shape) != (batch,):
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise ConfigError(f"the task's {what} returned {shape} for a batch of {batch}; it must "
                          f"return one value per example, shape ({batch},) (e.g. reduction='none')")
    return values


def code_fingerprint(task: Task) -> str:
    """A hash of the task's own functions (their source where Python has it, else their
    qualified names), so a store is not silently reused after the loss or measurement changed."""
    h = hashlib.blake2b(digest_size=12)
    fns = [("loss", task.loss), ("augment", task.augment), ("decays", task.decays)]
    fns += sorted(task.measurements.items())
    for name, fn in fns:
        h.update(name.encode())
        if fn is None:
            h.update(b"builtin")
            continue
        try:
            h.update(inspect.getsource(fn).encode())
        except (OSError, TypeError):
            h.update(getattr(fn, "__qualname__", type(fn).__name__).encode())
    return h.hexdigest()


TASK_SPEC_HELP = "FILE.py:FUNCTION, a zero-argument function returning a fastreplay.Task"


def load_task(spec: str) -> Task:
    """``path/to/file.py:make_task`` -> the Task that function returns (the CLI's ``--task``)."""
    path, sep, func = spec.rpartition(":")
    if not sep or not path or not func.isidentifier():
        raise ConfigError(f"--task {spec!r} is not {TASK_SPEC_HELP}; e.g. --task "
                          "examples/digits_mlp.py:make_task")
    file = Path(path)
    if file.suffix != ".py":  # importlib would find no loader for it (a traceback)
        raise ConfigError(f"--task file {path} is not a Python file (.py); give {TASK_SPEC_HELP}, "
                          "e.g. --task examples/digits_mlp.py:make_task (configs go to --config)")
    if not file.is_file():
        raise ConfigError(f"--task file {path} does not exist; give the path of a Python file")
    module_name = f"fastreplay_task_{hashlib.blake2b(str(file.resolve()).encode(), digest_size=6).hexdigest()}"
    spec_ = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(spec_)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec_.loader.exec_module(module)
    except SystemExit as exc:
        del sys.modules[module_name]
        raise ConfigError(f"--task file {path} called {_exit_call(exc)} while being imported; "
                          "a task file must define the function, not run a program: put the "
                          "script part under if __name__ == '__main__':") from None
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigError(f"--task file {path} failed to import ({type(exc).__name__}: "
                          f"{str(exc)[:160]}); fix it and rerun") from None
    make = getattr(module, func, None)
    if not callable(make):
        raise ConfigError(f"--task file {path} has no function {func!r}; name the function that "
                          "returns the Task")
    try:
        task = make()
    except SystemExit as exc:
        raise ConfigError(f"--task {spec}: {func}() called {_exit_call(exc)}; it must return "
                          "the Task (raise an exception to report a problem)") from None
    except Exception as exc:
        if isinstance(exc, (ConfigError, DataError)):
            raise
        raise ConfigError(f"--task {spec}: {func}() raised {type(exc).__name__}: "
                          f"{str(exc)[:160]}") from None
    return check_task(task)


def _exit_call(exc: SystemExit) -> str:
    """How the task's code exited, as the user wrote it: sys.exit(3), sys.exit('why')."""
    return f"sys.exit({'' if exc.code is None else repr(exc.code)[:80]})"

