"""What a run was trained on, beyond its config: a content fingerprint of the model (structure
and initial state), of the data (every training and test input and target) and of the task's
own code (loss, measurements, augmentation, decay rule).

The config fingerprint says which recipe made a store; it cannot see a CIFAR-10 copy that was
replaced, a user's model factory that now builds another network, or a data set edited in place.
Stores record these hashes when they are created and every later command recomputes them:
a mismatch is a clear error (retrain with --force, or use another run directory), never scores
silently matched to a run of other inputs. Stores made before the hashes existed are not checked.
"""
from __future__ import annotations

import hashlib

import torch

from ..exceptions import StoreError

ATTR = "inputs"


def _digest(parts) -> str:
    h = hashlib.blake2b(digest_size=12)
    for part in parts:
        if isinstance(part, torch.Tensor):
            part = part.detach().cpu().contiguous()
            h.update(f"{part.dtype}{tuple(part.shape)}".encode())
            part = part.view(torch.uint8).numpy() if part.numel() else b""
        elif isinstance(part, str):
            part = part.encode()
        h.update(part)
    return h.hexdigest()


def model_fingerprint(model) -> str:
    """The module's structure (every submodule's name and class, the parameter layout) and its
    initial parameters, frozen parameters and buffers, bit for bit. Class names rather than the module's repr,
    which torch may word differently from one release to the next."""
    modules = [(name, type(m).__name__) for name, m in model.module.named_modules()]
    layout = [(s.name, tuple(s.shape)) for s in model.param_slots]
    frozen = [part for name, p in model.frozen.items() for part in (name, p)]
    return _digest([repr(modules), repr(layout), model.theta0, model.buffers0, *frozen])


def data_fingerprint(data) -> str:
    return _digest([data.train_x, data.train_y, data.test_x, data.test_y])


def inputs_fingerprint(recipe) -> dict[str, str]:
    from ..task import code_fingerprint
    return {"model": model_fingerprint(recipe.model), "data": data_fingerprint(recipe.data),
            "task": code_fingerprint(recipe.task)}


WHAT = {"model": "model (its structure or initial weights)",
        "data": "data (the training or test inputs or targets)",
        "task": "task code (its loss, measurements, augmentation or decay rule)"}


def check_inputs(recipe, store) -> None:
    """Refuse a store whose recorded inputs differ from the recipe's (StoreError naming which)."""
    recorded = store.get_attr(ATTR)
    if not recorded:
        return  # made before the inputs were recorded
    now = inputs_fingerprint(recipe)
    changed = [k for k in WHAT if k in recorded and recorded[k] != now[k]]
    if changed:
        what = " and the ".join(WHAT[k] for k in changed)
        raise StoreError(f"{store.path} was trained with a different {what} than this run "
                         "builds now; pass the --task (or model_factory, data, task) it was "
                         "trained with, rerun with --force to retrain, or use another --run-dir")
