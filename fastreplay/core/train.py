"""The training loop: plain retraining (the counterfactual oracle) and the stored, checkpointed
run that the replay reverses."""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import torch

from ..exceptions import StoreError, TrainingError
from ..faults import crash_point
from ..progress import log, progress_bar
from .measure import accuracy
from .recipe import Recipe, TrainState
from .runtime import threads_of


def checkpoint_steps(num_steps: int, every: int) -> list[int]:
    """Steps whose *incoming* state is checkpointed: 0, every, 2*every, ... (< num_steps)."""
    return list(range(0, num_steps, every))


class _NanWatch:
    """Finds the first non-finite loss without a device sync per step."""

    def __init__(self, device):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self) -> None:
        step = int(self.first_bad)
        if step >= 0:
            err = TrainingError(f"training diverged: non-finite loss at step {step}; "
                                "lower train.lr or check the data")
            err.step = step  # for callers that name the run that diverged (LDS models)
            raise err


def run_steps(recipe: Recipe, state: TrainState, weights: torch.Tensor, stop: int,
              on_step=None, description: str = "train", watch: Optional[_NanWatch] = None,
              keep_mask: Optional[torch.Tensor] = None) -> TrainState:
    """Advance ``state`` to step ``stop``; ``on_step(state)`` runs *before* each step.

    ``watch`` (optional) lets ``on_step`` check for divergence before it stores a state.
    ``keep_mask`` (bool, per training example) takes the others out of their batches (LDS "drop"
    removal), under the same divergence watch as every other training loop.
    """
    watch = watch or _NanWatch(recipe.device)
    point = f"{description}_step"  # crash point (tests): train_step, rebuild_step, retrain_step
    with progress_bar(description, stop - state.step) as advance:
        while state.step < stop:
            if on_step is not None:
                on_step(state)
            t = state.step
            watch.update(recipe.step(state, weights, keep_mask=keep_mask), t)
            crash_point(point)
            advance()
    watch.check()
    return state


def train(recipe: Recipe, weights: Optional[torch.Tensor] = None) -> TrainState:
    """Train from the seed's initialisation with per-example weights (default all ones)."""
    w = recipe.ones() if weights is None else weights.to(recipe.device, recipe.dtype)
    return run_steps(recipe, recipe.init_state(), w, recipe.num_steps)


def window_start(recipe: Recipe, store) -> TrainState:
    """The scored run's state at replay.start_step, where retrainings for the attribution window
    begin: every earlier step is shared by all of them, so it is not recomputed M times. Taken
    from the last stored checkpoint at or before it (stepped on with w = 1), or from the
    initialisation when the checkpoints were cleaned."""
    start = recipe.plan.start_step
    state = recipe.init_state()
    if start > 0 and store.status != "cleaned":
        steps = [int(s) for s in store.checkpoint_steps()]
        usable = [j for j, s in enumerate(steps) if 0 <= s <= start]
        if usable:
            slot = max(usable, key=steps.__getitem__)
            state = recipe.stored_state(store.read_checkpoint(slot))
    return run_steps(recipe, state, recipe.ones(), start, description="window start")


def train_into_store(recipe: Recipe, store) -> tuple[TrainState, float]:
    """train_into_store under the run's recorded CPU thread count (runtime.threads_of), so a
    resumed run is bitwise the uninterrupted one on any machine."""
    with threads_of(store, recipe.device):
        return _train_into_store(recipe, store)


def _train_into_store(recipe: Recipe, store) -> tuple[TrainState, float]:
    """Train with w = 1, streaming checkpoints and the final state into ``store``.

    Resumes from the last committed checkpoint when the store holds a partial run (a SIGKILL at
    any point loses at most the steps since that checkpoint, and the resumed run is bitwise the
    uninterrupted one: the state is the whole of it). The final state is flushed before the status
    turns "trained", in one metadata write with the training time and test accuracy.
    Returns the final state and the training wall time in seconds (this call only).
    """
    every = recipe.cfg.replay.checkpoint_every
    steps = checkpoint_steps(recipe.num_steps, every)
    m = recipe.model
    store.allocate(num_steps=recipe.num_steps, batch_size=recipe.cfg.train.batch_size,
                   num_groups=len(m.group_ends), num_checkpoints=len(steps),
                   num_params=m.num_params, num_buffers=m.num_buffers,
                   state_size=recipe.optimizer.state_size(m.num_params),
                   dtype=recipe.cfg.train.dtype)
    committed = store.checkpoint_steps()
    prefix = 0  # slots 0..prefix-1 committed: resume from the last of them
    while prefix < len(committed) and committed[prefix] == steps[prefix]:
        prefix += 1
    if prefix:
        state = recipe.stored_state(store.read_checkpoint(prefix - 1))
        log.info("resuming training from the checkpoint at step %d", state.step)
    else:
        store.write_schedule(recipe.plan.indices_np.astype(np.int32), recipe.optimizer.lrs)
        state = recipe.init_state()
    store.status = "training"
    slot_of = {s: i for i, s in enumerate(steps)}

    watch = _NanWatch(recipe.device)

    def save(st: TrainState) -> None:
        slot = slot_of.get(st.step)
        if slot is not None and slot >= prefix:
            watch.check()  # never commit a diverged state (one sync per checkpoint)
            store.write_checkpoint(slot, st.step, st.theta, st.opt_state, st.buffers)

    if recipe.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        run_steps(recipe, state, recipe.ones(), recipe.num_steps, on_step=save, watch=watch)
    except TrainingError:
        store.flush()  # keep the checkpoints before the divergence
        raise TrainingError(f"training diverged: non-finite loss at step {int(watch.first_bad)} "
                            f"(train.lr={recipe.cfg.train.lr:g}); lower train.lr or check the data, "
                            "then rerun with --force or another --run-dir (a new config is a new "
                            "run)") from None
    store.write_final(state.theta, state.buffers)  # the store copies on submit
    store.flush()
    if recipe.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    acc = accuracy(recipe, state.theta, state.buffers)
    # The commit of the run: final state flushed first, then one atomic metadata write.
    store.set_attrs({"status": "trained", "train_seconds": seconds, "test_accuracy": acc})
    crash_point("trained")
    return state, seconds


def load_final(recipe: Recipe, store) -> TrainState:
    if store.status not in ("trained", "cleaned"):
        raise StoreError(f"run store {store.path} holds no finished training run "
                         f"(status {store.status!r}); run `fastreplay magic` to finish it")
    params, buffers = store.read_final()
    theta = recipe.tensor(params)
    return TrainState(theta, torch.zeros_like(theta), recipe.tensor(buffers), recipe.num_steps)
