"""The fast replay against the unrolled-autograd oracle, across backends and checkpoint intervals."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SMALL

from fastreplay.config import load_config, with_values
from fastreplay.core import kernels
from fastreplay.core.recipe import Recipe
from fastreplay.core.reference import unrolled_scores
from fastreplay.core.replay import replay
from fastreplay.core.train import train
from fastreplay.interface.api import open_or_train


def _cfg(*extra):
    return load_config("test", overrides=SMALL + list(extra))


@pytest.mark.parametrize("model", ["tiny-cnn", "mlp"])
@pytest.mark.parametrize("backend,hvp", [("reference", "reverse"), ("fused", "reverse"),
                                         ("fused", "forward"), ("fused", "forward-vmap")])
def test_replay_equals_unrolled_oracle(model, backend, hvp, tmp_path):
    if backend == "fused" and not kernels.extension_loaded():
        pytest.skip(f"compiled extension not loaded: {kernels.extension_error()}")
    cfg = _cfg(f"model.name={model}", f"replay.backend={backend}", f"replay.hvp={hvp}")
    recipe, store = open_or_train(cfg, tmp_path)
    targets = [0, 2, 5]
    fast = replay(recipe, store, targets, "loss").scores
    oracle = unrolled_scores(recipe, targets, "loss").detach().cpu().numpy()
    # Same arithmetic up to summation order: float64 rounding, ~1e-15 relative.
    np.testing.assert_allclose(fast, oracle, rtol=0, atol=1e-12 * np.abs(oracle).max())
    assert np.abs(oracle).max() > 1e-3


@pytest.mark.parametrize("start_step", [0, 5])
def test_scores_identical_across_checkpoint_schedules(tmp_path, start_step):
    """Bitwise: every checkpoint interval and the k-ary tree do the same per-step arithmetic."""
    results = {}
    for every, schedule, arity in ((1, "every", 2), (1, "interval", 2), (4, "interval", 2),
                                   (100, "interval", 2), (100, "tree", 2), (7, "tree", 3),
                                   (100, "tree", 4)):
        cfg = _cfg(f"replay.checkpoint_every={every}", f"replay.schedule={schedule}",
                   f"replay.tree_arity={arity}", f"replay.start_step={start_step}")
        recipe, store = open_or_train(cfg, tmp_path / f"e{every}{schedule}{arity}")
        results[(every, schedule, arity)] = replay(recipe, store, [1, 3], "margin").scores
    first = next(iter(results.values()))
    assert np.abs(first).max() > 0
    for key, scores in results.items():
        assert np.array_equal(scores, first), key


def test_batched_targets_equal_one_at_a_time(tmp_path):
    cfg = _cfg()
    recipe, store = open_or_train(cfg, tmp_path)
    both = replay(recipe, store, [2, 6], "loss").scores
    one = replay(recipe, store, [6], "loss").scores
    np.testing.assert_array_equal(both[1], one[0])


def test_retraining_is_bitwise_identical():
    cfg = _cfg()
    recipe = Recipe(cfg)
    a, b = train(recipe), train(recipe)
    assert torch.equal(a.theta, b.theta) and torch.equal(a.buffers, b.buffers)


def _tamper(store, slot, part: str, change) -> None:
    """Rewrite one part (params, momentum or buffers) of a stored checkpoint, or of the final
    state (slot "final": params and buffers, no momentum)."""
    if slot == "final":
        names, parts = ("params", "buffers"), store.read_final()
    else:
        names, (step, *parts) = ("params", "momentum", "buffers"), store.read_checkpoint(slot)
    parts = [torch.from_numpy(change(a.copy()) if name == part else a)
             for name, a in zip(names, parts)]
    if slot == "final":
        store.write_final(*parts)
    else:
        store.write_checkpoint(slot, step, *parts)
    store.flush()


def _last_bit_of_the_smallest(a):
    """One ulp added to the entry of smallest magnitude: a trace a non-deterministic kernel
    could leave, too small to reach theta within a segment (lr * mu * ulp(m) stays far below
    ulp(theta))."""
    i = np.argmin(np.abs(a))
    a[i] = np.nextafter(a[i], np.inf)
    return a


def _shift_first(a):
    a[0] += 1e-3
    return a


@pytest.mark.parametrize("slot,part,change,found", [
    # Moved params move everything after them: the rebuild of steps 5..10 from them misses
    # checkpoint 2 (replay goes last segment first).
    (1, "params", _shift_first, r"steps 5..10 .* bit for bit \(params, momentum and buffers"),
    # Neither of these moves theta, so a check of params alone lets them through (the
    # momentum change is below theta's rounding; BatchNorm running statistics never feed back
    # into a training step): only comparing the part itself finds them.
    (1, "momentum", _last_bit_of_the_smallest, r"steps 0..5 .* bit for bit \(momentum differ"),
    (1, "buffers", _shift_first, r"bit for bit \(buffers differ"),
    # The last segment lands on the final state, which stores no momentum.
    ("final", "buffers", _shift_first, r"steps 10..12 .* bit for bit \(buffers differ"),
])
def test_replay_detects_a_tampered_checkpoint(tmp_path, slot, part, change, found):
    """A stored state that the forward steps do not reproduce, in any of its parts, must stop
    the replay (12 steps, checkpoints every 5: slot 1 holds step 5)."""
    from fastreplay.exceptions import ReplayError
    recipe, store = open_or_train(_cfg(), tmp_path)
    _tamper(store, slot, part, change)
    with pytest.raises(ReplayError, match=found):
        replay(recipe, store, [0], "loss")


def _with_vmap_out_of_memory(monkeypatch):
    """Pretend to be on CUDA with a vmapped step that runs out of memory."""
    from fastreplay.core import replay as replay_mod
    real = replay_mod._tangent_fn

    def tangent_fn(recipe, batched):
        if not batched:
            return real(recipe, batched)

        def out_of_memory(*args):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return out_of_memory
    monkeypatch.setattr(replay_mod, "_on_cuda", lambda recipe: True)
    monkeypatch.setattr(replay_mod, "_tangent_fn", tangent_fn)


def test_auto_falls_back_to_one_measurement_per_pass_when_vmap_runs_out_of_memory(
        tmp_path, monkeypatch):
    import logging

    from fastreplay.core.replay import hvp_mode
    from fastreplay.progress import log
    recipe, store = open_or_train(_cfg("replay.hvp=forward"), tmp_path)
    expected = replay(recipe, store, [1, 4], "loss").scores
    recipe = Recipe(with_values(recipe.cfg, {"replay.hvp": "auto"}))
    _with_vmap_out_of_memory(monkeypatch)
    assert hvp_mode(recipe, 2) == "forward-vmap" and hvp_mode(recipe, 1) == "forward"
    warnings = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: warnings.append(record.getMessage())
    log.addHandler(handler)  # the CLI's logging set-up may stop propagation to pytest's caplog
    monkeypatch.setattr(log, "level", logging.INFO)
    try:
        got = replay(recipe, store, [1, 4], "loss").scores
    finally:
        log.removeHandler(handler)
    np.testing.assert_array_equal(got, expected)
    assert hvp_mode(recipe, 2) == "forward"  # remembered: no second try
    assert sum("ran out of GPU memory" in m for m in warnings) == 1


def test_explicit_vmap_out_of_memory_is_one_clear_error(tmp_path, monkeypatch):
    from fastreplay.exceptions import ReplayError
    recipe, store = open_or_train(_cfg("replay.hvp=forward-vmap"), tmp_path)
    _with_vmap_out_of_memory(monkeypatch)
    with pytest.raises(ReplayError, match="replay.target_batch"):
        replay(recipe, store, [1, 4], "loss")
