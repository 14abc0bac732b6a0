"""Measurements phi(theta_T, b_T) of test examples in eval mode, their gradients, and accuracy."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from ..exceptions import ConfigError, TrainingError
from ..task import per_example
from .recipe import Recipe


def parse_targets(spec: str, num_test: int) -> list[int]:
    """'0,5,7' or '0:50' (or a mix, '0:10,42') -> sorted unique test indices, range-checked.

    Ranges are checked against the test set before they are expanded, so a typo such as
    0:99999999999 is a one-line error instead of a list that eats the memory.
    """
    spans = _target_spans(spec)
    for lo, hi in spans:
        if lo < hi and (lo < 0 or hi > num_test):
            bad = lo if lo < 0 or lo >= num_test else num_test
            raise ConfigError(f"target {bad} is out of range: the test set has {num_test} "
                              f"examples (valid 0..{num_test - 1}); raise data.num_test or pick "
                              "smaller ids")
    out = sorted({i for lo, hi in spans for i in range(lo, hi)})
    if not out:
        raise ConfigError(f"targets {spec!r} select no test example; use e.g. 0,5,7 or 0:50")
    return out


def _target_spans(spec: str) -> list[tuple[int, int]]:
    """The half-open ranges [lo, hi) a targets spec names ('7' is [7, 8)), not expanded."""
    spans = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if not part:
                continue
            if ":" in part:
                lo, hi = part.split(":", 1)
                spans.append((int(lo or 0), int(hi)))
            else:
                spans.append((int(part), int(part) + 1))
    except ValueError:
        raise ConfigError(f"targets {spec!r} are not integers; use e.g. 0,5,7 or 0:50") from None
    return spans


def measurement_values(recipe: Recipe, outputs: torch.Tensor, targets: torch.Tensor,
                       kind: str) -> torch.Tensor:
    """The task's measurement of ``kind`` on test outputs, checked to give one value each."""
    return per_example(recipe.measurement(kind)(outputs, targets), targets.shape[0],
                       f"{kind} measurement")


def measure(recipe: Recipe, theta: torch.Tensor, buffers: torch.Tensor, targets: list[int],
            kind: str) -> torch.Tensor:
    idx = torch.as_tensor(targets, device=recipe.device)
    with torch.no_grad():
        outputs, _ = recipe.model.forward(theta, buffers, recipe.data.test_batch(idx), train=False)
        return measurement_values(recipe, outputs, recipe.data.test_y[idx], kind)


def measurement_grads(recipe: Recipe, theta: torch.Tensor, buffers: torch.Tensor,
                      targets: list[int], kind: str):
    """(values (K,), d phi/d theta (K, P), d phi/d buffers (K, Q)) for each target."""
    theta = theta.detach().requires_grad_(True)
    buffers = buffers.detach().requires_grad_(buffers.numel() > 0)
    inputs = (theta, buffers) if buffers.requires_grad else (theta,)
    values, g_theta, g_buf = [], [], []
    # One target per forward pass: a target's gradient must not depend on which other targets
    # share its batch (convolution kernels may block differently by batch size), so that
    # sharded and batched replays give bitwise the same scores.
    for t in targets:
        idx = torch.as_tensor([t], device=recipe.device)
        outputs, _ = recipe.model.forward(theta, buffers, recipe.data.test_batch(idx), train=False)
        value = measurement_values(recipe, outputs, recipe.data.test_y[idx], kind)[0]
        grads = torch.autograd.grad(value, inputs)
        values.append(value.detach())
        g_theta.append(grads[0])
        g_buf.append(grads[1] if len(grads) > 1 else buffers.new_zeros(0))
    values, g_theta, g_buf = torch.stack(values), torch.stack(g_theta), torch.stack(g_buf)
    check_finite_measurements(values, g_theta, g_buf, theta,
                              [f"the {kind} measurement of test {t}" for t in targets])
    return values, g_theta, g_buf


def check_finite_measurements(values: torch.Tensor, g_theta: torch.Tensor, g_buf: torch.Tensor,
                              theta: torch.Tensor, names: list[str]) -> None:
    """A TrainingError at the first measurement (``names[k]`` for row k) whose value or gradient
    is NaN or inf: the replay would carry it into every score of its row, silently."""
    finite = (torch.isfinite(values) & torch.isfinite(g_theta).all(1)
              & torch.isfinite(g_buf).all(1))
    if bool(finite.all()):
        return
    k = int((~finite).nonzero()[0, 0])
    value = float(values[k])
    what = f"is {value}" if not np.isfinite(value) else "has a non-finite gradient"
    why = ("the trained weights are not finite (training diverged at its last steps: lower "
           "train.lr)" if not bool(torch.isfinite(theta).all()) else
           "check the measurement at the trained weights (a log or division of 0, say)")
    raise TrainingError(f"{names[k]} {what} at the end of training, so its scores would be "
                        f"NaN; {why}, or score other targets (no scores were stored)")


def accuracy_logits(recipe: Recipe, theta: torch.Tensor, buffers: torch.Tensor,
                    x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits the accuracy is judged on: with measure.tta=flip the mean of the
    logits of x and of its horizontal mirror. Only the accuracy figure uses this; measurements
    (and so scores) are the plain logits' (see MeasureConfig.tta)."""
    logits, _ = recipe.model.forward(theta, buffers, x, train=False)
    if recipe.cfg.measure.tta == "flip":
        mirrored, _ = recipe.model.forward(theta, buffers, x.flip(-1), train=False)
        logits = 0.5 * logits + 0.5 * mirrored
    return logits


def accuracy(recipe: Recipe, theta: torch.Tensor, buffers: torch.Tensor, batch: int = 1000,
             examples: Optional[Sequence[int]] = None) -> float:
    """Fraction of test targets whose largest output is the target: per example for class
    labels (N,), per position for sequences of labels (N, T) with outputs (N, T, classes). NaN
    where the task's targets are not class labels of its outputs (e.g. a regression).
    ``examples``: the test ids to judge (default: all of them)."""
    data, correct, total = recipe.data, 0, 0
    if data.test_y.is_floating_point():
        return float("nan")
    ids = (torch.arange(data.num_test) if examples is None
           else torch.as_tensor(list(examples), dtype=torch.long)).to(recipe.device)
    with torch.no_grad():
        for lo in range(0, len(ids), batch):
            idx = ids[lo:lo + batch]
            logits = accuracy_logits(recipe, theta, buffers, data.test_batch(idx))
            labels = data.test_y[idx]
            if logits.shape[:-1] != labels.shape:
                return float("nan")
            correct += int((logits.argmax(-1) == labels).sum())
            total += labels.numel()
    return correct / max(1, total)


GROUP_CHUNK = 256
"""Test examples per forward pass of a group measurement: fixed, so that a group's gradient is
the same whatever else runs (kernels may block differently by batch size)."""


def group_measurement_grads(recipe: Recipe, theta: torch.Tensor, buffers: torch.Tensor,
                            members: list[int], kind: str):
    """The mean measurement over ``members`` (one group, measure.reduce=mean) as one row:
    (value (1,), d phi/d theta (1, P), d phi/d buffers (1, Q))."""
    theta = theta.detach().requires_grad_(True)
    buffers = buffers.detach().requires_grad_(buffers.numel() > 0)
    inputs = (theta, buffers) if buffers.requires_grad else (theta,)
    total = torch.zeros((), dtype=theta.dtype, device=theta.device)
    g_theta, g_buf = torch.zeros_like(theta), torch.zeros_like(buffers)
    for lo in range(0, len(members), GROUP_CHUNK):
        idx = torch.as_tensor(members[lo:lo + GROUP_CHUNK], device=recipe.device)
        outputs, _ = recipe.model.forward(theta, buffers, recipe.data.test_batch(idx), train=False)
        chunk = measurement_values(recipe, outputs, recipe.data.test_y[idx], kind).sum()
        grads = torch.autograd.grad(chunk, inputs)
        total += chunk.detach()
        g_theta += grads[0]
        if len(grads) > 1:
            g_buf += grads[1]
    n = len(members)
    values, g_theta, g_buf = (total / n)[None], (g_theta / n)[None], (g_buf.detach() / n)[None]
    check_finite_measurements(values, g_theta, g_buf, theta,
                              [f"the mean {kind} measurement of {n} test example(s)"])
    return values, g_theta, g_buf


def group_name(members: list[int]) -> str:
    """A stable store name for a set of test examples (other than ``all`` and a class, which
    resolve_group names itself): its size and a hash of its sorted members."""
    import hashlib
    digest = hashlib.blake2b(",".join(map(str, sorted(members))).encode(), digest_size=5)
    return f"set{len(members)}-{digest.hexdigest()}"


def resolve_group(spec: str, recipe: Recipe) -> tuple[str, list[int]]:
    """``--group`` -> (store name, sorted test ids): ``all`` (the whole test set), ``class:C``
    (every test example labelled C, a number or a class name), a file of test ids (.npy, or
    text: whitespace- or comma-separated integers) or a targets spec (0:100, 3,7,9)."""
    from pathlib import Path

    data = recipe.data
    num_test = data.num_test
    if spec == "all":
        return "all", list(range(num_test))
    if spec.startswith("class:"):
        label = spec.split(":", 1)[1]
        names = list(data.class_names or [])
        if label in names:
            c = names.index(label)
        else:
            try:
                c = int(label)
            except ValueError:
                raise ConfigError(f"--group {spec!r}: no class {label!r}; use class:N or one of "
                                  f"{', '.join(names) or 'the class numbers'}") from None
        labels = data.test_y.cpu().numpy()
        if labels.ndim != 1:
            raise ConfigError(f"--group {spec!r}: the test targets are not class labels; give "
                              "the group as test ids (a file or a targets spec)")
        members = [int(i) for i in np.flatnonzero(labels == c)]
        if not members:
            raise ConfigError(f"--group {spec!r}: no test example has label {c}")
        return f"class{c}", members
    path = Path(spec)
    if path.is_file():
        try:
            ids = (np.load(path) if path.suffix == ".npy"
                   else np.array(path.read_text().replace(",", " ").split(), dtype=np.int64))
        except (ValueError, OSError) as exc:
            raise ConfigError(f"--group file {spec} is not a list of test ids ({exc}); write "
                              "integers, one per line or comma-separated, or a .npy array") from None
        if ids.dtype.kind not in "iu":  # int() would truncate 2.7 to 2, True to 1: other ids
            fix = ("np.save(f, np.flatnonzero(mask)) for a mask" if ids.dtype.kind == "b"
                   else "np.save(f, ids.astype(np.int64))")
            raise ConfigError(f"--group file {spec} holds {ids.dtype} values, not test ids; save "
                              f"integer ids, e.g. {fix}")
        members = parse_targets(",".join(str(int(i)) for i in np.ravel(ids)), num_test)
        return group_name(members), members
    members = parse_targets(spec, num_test)
    return group_name(members), members
