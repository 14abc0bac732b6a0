"""Linear datamodeling score (DESIGN.md section 2): do the scores predict counterfactual retraining?

M seeded random subsets keep a fraction ``keep`` of the training set; model j retrains under the
identical schedule with w = 1_{S_j} ("weight" removal: weight 0 in the same batch slots, exactly
what the scores differentiate; the example still shapes BatchNorm batch statistics) or with the
removed examples taken out of their batches ("drop": the classic definition, the batch shrinks and
its loss is averaged over the examples that remain). For each measurement k the prediction is
sum_{i in S_j} tau_{k,i} and LDS_k is the Spearman correlation over j of prediction and measured
value. Everything lands in the run store under lds/<removal>_keep<keep>/ and is resumable.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
from scipy.stats import rankdata

from .arguments import check_lds_arguments
from .distributed import barrier, gather_all, is_main, shard, world_size
from .config import score_name
from .exceptions import ConfigError, StoreError
from .measure import measure
from .multitrain import choose_models_per_batch, train_many
from .progress import log, progress_bar
from .recipe import Recipe, TrainState
from .train import run_steps, window_start


@dataclass
class LdsResult:
    lds_mean: float
    lds_ci: list
    per_target: dict
    keep: float
    models: int
    removal: str
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


def subset_masks(num_train: int, models: int, keep: float, seed: int) -> np.ndarray:
    """(M, N) bool: each row keeps exactly round(keep * N) examples, drawn from its own stream."""
    n_keep = int(round(keep * num_train))
    masks = np.zeros((models, num_train), dtype=bool)
    for j in range(models):
        masks[j, np.random.default_rng([seed, 0x1D5, j]).permutation(num_train)[:n_keep]] = True
    return masks


def spearman_rows(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """Spearman correlation per column of (M, K) arrays (NaN where a column is constant)."""
    rp, ra = rankdata(pred, axis=0), rankdata(actual, axis=0)
    rp -= rp.mean(0)
    ra -= ra.mean(0)
    denom = np.sqrt((rp ** 2).sum(0) * (ra ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rp * ra).sum(0) / denom


def lds_statistics(scores: np.ndarray, masks: np.ndarray, values: np.ndarray,
                   bootstrap: int = 1000, seed: int = 0):
    """(per-target LDS (K,), mean, 95% bootstrap interval over models) for (K,N) scores."""
    pred = masks.astype(np.float64) @ scores.T  # (M, K)
    per_target = spearman_rows(pred, values)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(bootstrap):
        j = rng.integers(0, len(masks), size=len(masks))
        boots.append(np.nanmean(spearman_rows(pred[j], values[j])))
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return per_target, float(np.nanmean(per_target)), [float(lo), float(hi)]


def stored_scores(recipe: Recipe, store) -> tuple[np.ndarray, list[int]]:
    """The run's scores (targets x N) and their target ids, or a clear error if there are none."""
    name = score_name(recipe.cfg)
    if name not in store.score_names():
        raise StoreError(f"{store.path} holds no {name} scores; run `fastreplay magic` first")
    scores, attrs = store.read_scores(name)
    return scores, [int(t) for t in attrs["targets"]]


def retrain_subset(recipe: Recipe, mask: np.ndarray, removal: str, start: TrainState) -> tuple:
    """Final (theta, buffers) of a retraining on the subset ``mask`` under the same schedule,
    from the shared state ``start`` (the run's state where the data weights begin to act)."""
    w = torch.from_numpy(mask.astype(np.float64)).to(recipe.device, recipe.dtype)
    state = start.clone()
    if removal == "weight":
        run_steps(recipe, state, w, recipe.num_steps, description="retrain")
    else:
        keep = torch.from_numpy(mask).to(recipe.device)
        while state.step < recipe.num_steps:
            recipe.step(state, w, keep_mask=keep)
    return state.theta, state.buffers


def run_lds(recipe: Recipe, store, models: int, keep: float, targets: Optional[list[int]],
            removal: str = "weight", mask_seed: int = 0, models_per_batch: int = 0):
    """Returns (result, predicted (M, K), measured (M, K)) for the chosen targets."""
    check_lds_arguments(models, keep, removal, mask_seed, models_per_batch, recipe.num_train)
    kind = recipe.cfg.measure.kind
    all_scores, scored = stored_scores(recipe, store)
    targets = targets or scored
    missing = sorted(set(targets) - set(scored))
    if missing:
        raise ConfigError(f"targets {missing[:5]} have no scores yet; score them with "
                          "`fastreplay magic --targets ...` first")
    scores = all_scores[[scored.index(t) for t in targets]]
    masks = subset_masks(recipe.num_train, models, keep, mask_seed)
    group = f"lds/{removal}_keep{keep:g}"
    attrs = {"keep": keep, "removal": removal, "mask_seed": mask_seed, "kind": kind}
    if is_main():  # rank 0 creates the group; the other ranks open it after the barrier
        values = store.lds_values(group, masks, scored, attrs)
    barrier()
    if not is_main():
        values = store.lds_values(group, masks, scored, attrs)
    todo = shard([j for j in range(models) if np.isnan(values[j]).any()])
    t0 = time.perf_counter()
    if todo:
        log.info("LDS: training %d of %d subset models (keep %.3g, %s removal)",
                 len(todo), models, keep, removal)
    per_batch = 1
    start = window_start(recipe, store) if todo else None
    if todo and removal == "weight":  # drop removal changes batch sizes per model: one at a time
        per_batch = models_per_batch or choose_models_per_batch(recipe, len(todo))
    with progress_bar("LDS models", len(todo)) as advance:
        for lo in range(0, len(todo), per_batch):
            chunk = todo[lo:lo + per_batch]
            if per_batch == 1:
                finals = [retrain_subset(recipe, masks[chunk[0]], removal, start)]
            else:
                st = train_many(recipe, torch.from_numpy(masks[chunk].astype(np.float64)),
                                start=start)
                finals = list(zip(st.theta, st.buffers))
            for j, (theta, buffers) in zip(chunk, finals):
                row = measure(recipe, theta, buffers, scored, kind).cpu().numpy()
                store.write_lds_row(group, j, row)
                values[j] = row
            advance(len(chunk))
    seconds = time.perf_counter() - t0
    if todo:
        log.info("LDS: %d models in %.1fs (%.1f models/min, %d per batch)", len(todo), seconds,
                 60 * len(todo) / seconds, per_batch)
    seconds = max(gather_all(seconds))  # the slowest rank's share is the wall time
    barrier()  # every rank has written its own rows (one chunk each)
    if not is_main():
        return None, None, None
    if world_size() > 1:
        values = store.lds_values(group, masks, scored, attrs)
    measured = values[:, [scored.index(t) for t in targets]]
    per_target, mean, ci = lds_statistics(scores, masks, measured)
    result = LdsResult(mean, ci, {"index": targets, "lds": [float(x) for x in per_target]},
                       keep, models, removal, seconds)
    store.write_lds_result(group, result.to_json())
    return result, masks.astype(np.float64) @ scores.T, measured
