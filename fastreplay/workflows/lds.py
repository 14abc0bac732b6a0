"""Linear datamodeling score (docs/design.md §11): do the scores predict counterfactual retraining?

M seeded random subsets keep a fraction ``keep`` of the training set; model j retrains under the
identical schedule with w = 1_{S_j} ("weight" removal: weight 0 in the same batch slots, exactly
what the scores differentiate; the example still shapes BatchNorm batch statistics) or with the
removed examples taken out of their batches ("drop": the classic definition, the batch shrinks and
its loss is averaged over the examples that remain). For each measurement k the prediction is
sum_{i in S_j} tau_{k,i} and LDS_k is the Spearman correlation over j of prediction and measured
value. Everything lands in the run store under lds/<removal>_keep<keep>/ and is resumable; a NaN
row means "not trained yet", so a model that diverges is an error, never a NaN row.
"""
from __future__ import annotations

import re
import time
import warnings
from dataclasses import asdict, dataclass
from typing import NamedTuple, Optional

import numpy as np
import torch
from scipy.stats import rankdata
from scipy.stats import t as student_t

from ..config import score_name
from ..core.measure import measure
from ..core.multitrain import choose_models_per_batch, train_many
from ..core.recipe import Recipe, TrainState
from ..core.train import run_steps, window_start
from ..distributed import barrier, gather_all, is_main, shard, world_size
from ..exceptions import ConfigError, StoreError, TrainingError
from ..interface.arguments import check_lds_arguments
from ..progress import log, progress_bar

CI_METHOD = "jackknife over models (bias-corrected, t interval)"


@dataclass
class LdsResult:
    lds_mean: float
    lds_ci: list
    per_target: dict
    keep: float
    models: int
    removal: str
    seconds: float = 0.0
    ci_method: str = CI_METHOD  # how lds_ci was computed (older results: percentile bootstrap)
    lds_bias_corrected: float = float("nan")  # the centre of lds_ci (see lds_statistics)

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


class LdsStatistics(NamedTuple):
    per_target: np.ndarray  # (K,) Spearman rho of each target over the M models
    mean: float  # the LDS: the mean of per_target
    ci: list  # 95% interval for the mean over the targets of the population rho (M -> inf)
    bias_corrected: float  # the interval's centre: the mean with the O(1/M) bias removed


def mean_spearman(pred: np.ndarray, actual: np.ndarray) -> float:
    with warnings.catch_warnings():  # every target constant: NaN, said once by the caller
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(np.nanmean(spearman_rows(pred, actual)))


def jackknife_interval(pred: np.ndarray, actual: np.ndarray, level: float = 0.95
                       ) -> tuple[float, list]:
    """(bias-corrected mean Spearman rho, [lo, hi]) from the M delete-one-model estimates.

    Deleting a model drops it for every target at once, so the standard error carries the
    correlation between targets that share the same retrainings. The bias-corrected estimate
    M theta - (M - 1) mean(theta_-j) removes the O(1/M) bias of Spearman's rho (its expectation
    is rho + 3 (tau - rho) / (M + 1)) up to O(1/M^2); t with M - 1 degrees of freedom.
    """
    m = len(pred)
    full = mean_spearman(pred, actual)
    left_out = np.array([mean_spearman(np.delete(pred, j, 0), np.delete(actual, j, 0))
                         for j in range(m)])
    corrected = m * full - (m - 1) * left_out.mean()
    se = np.sqrt((m - 1) / m * ((left_out - left_out.mean()) ** 2).sum())
    half = float(student_t.ppf((1 + level) / 2, m - 1)) * se
    return float(corrected), [float(corrected - half), float(corrected + half)]


def lds_statistics(scores: np.ndarray, masks: np.ndarray, values: np.ndarray) -> LdsStatistics:
    """Per-target LDS, their mean and a 95% interval, for (K, N) scores, (M, N) masks and (M, K)
    measured values.

    The interval is for the mean over these targets of each target's population Spearman rho
    (its value as M -> infinity): the targets are given, the M subsets are the random draw. The
    sample rho is biased towards 0 by O(1/M), at M = 100 about one standard error of the mean
    over 20-50 targets, so the interval is the delete-one-model jackknife's, centred on the
    bias-corrected mean (the LDS itself may lie just below it). A bootstrap over models is biased
    further by the rank ties of duplicated models: in simulations with a known population value
    the old percentile interval covered it 0.32-0.87 of the time, BCa 0.36, this one 0.93-0.97
    (five settings, 5-50 targets, 16-100 models; tests/test_lds_stats.py keeps one).
    """
    pred = masks.astype(np.float64) @ scores.T  # (M, K)
    per_target = spearman_rows(pred, values)
    center, ci = jackknife_interval(pred, values)
    return LdsStatistics(per_target, mean_spearman(pred, values), ci, center)


def stored_scores(recipe: Recipe, store) -> tuple[np.ndarray, list[int]]:
    """The run's scores (targets x N) and their target ids, or a clear error if there are none."""
    name = score_name(recipe.cfg)
    if name not in store.score_names():
        raise StoreError(f"{store.path} holds no {name} scores; run `fastreplay magic` first")
    scores, attrs = store.read_scores(name)
    return scores, [int(t) for t in attrs["targets"]]


class ChosenScores(NamedTuple):
    scores: np.ndarray  # (targets, N): the rows of ``targets``
    targets: list[int]
    scored: list[int]  # every target the store holds scores for


def scores_of(recipe: Recipe, store, targets: Optional[list[int]]) -> ChosenScores:
    """The stored scores of ``targets`` (None or empty: every scored target); a target without
    scores is a one-line ConfigError."""
    all_scores, scored = stored_scores(recipe, store)
    targets = list(targets or scored)
    missing = sorted(set(targets) - set(scored))
    if missing:
        raise ConfigError(f"targets {missing[:5]} have no scores yet; score them with "
                          "`fastreplay magic --targets ...` first")
    return ChosenScores(all_scores[[scored.index(t) for t in targets]], targets, scored)


def lds_group(recipe: Recipe, removal: str, keep: float) -> str:
    """Where an LDS experiment lives in the store: by removal and keep, and by the window when
    it is not the run's own (workflows that take a scored window: scored_window)."""
    return f"lds/{removal}_keep{keep:g}{recipe.window_suffix()}"


def scored_window(recipe: Recipe, store) -> Recipe:
    """The recipe of the window the stored scores belong to: the run's own when it is scored,
    else the one other window scored (`magic --set replay.window_epochs=E` on a stored run, as
    `fastreplay window` recommends), so that `lds` and `compare` retrain that window."""
    names = store.score_names()
    if score_name(recipe.cfg) in names:
        return recipe
    kind = recipe.cfg.measure.kind
    starts = sorted({0 if n == kind else int(n[len(kind) + len("_from"):]) for n in names
                     if n == kind or re.fullmatch(rf"{re.escape(kind)}_from\d+", n)})
    if len(starts) > 1:
        raise ConfigError(f"the store holds {kind} scores of several attribution windows (first "
                          f"steps {starts}) but none of the run's own (from step "
                          f"{recipe.run_window_start}); keep the scores of one window per run "
                          "directory: train another with --set replay.window_epochs=E")
    if not starts:
        return recipe
    log.info("the stored %s scores are of the window from step %d (not the run's own, from "
             "step %d): using that window", kind, starts[0], recipe.run_window_start)
    return recipe.with_window(starts[0])


def retrain_subset(recipe: Recipe, mask: np.ndarray, removal: str, start: TrainState) -> tuple:
    """Final (theta, buffers) of a retraining on the subset ``mask`` under the same schedule,
    from the shared state ``start`` (the run's state where the data weights begin to act)."""
    w = torch.from_numpy(mask.astype(np.float64)).to(recipe.device, recipe.dtype)
    keep = torch.from_numpy(mask).to(recipe.device) if removal == "drop" else None
    state = run_steps(recipe, start.clone(), w, recipe.num_steps, description="retrain",
                      keep_mask=keep)  # raises TrainingError on a non-finite loss
    return state.theta, state.buffers


def _advice(removal: str) -> str:
    drop = ", or use --removal weight" if removal == "drop" else ""
    return (f"lower train.lr (a new run) or remove fewer examples (a larger --keep){drop}; "
            "the models already measured are kept")


def diverged(models: list[int], removal: str, keep: float, err: TrainingError) -> TrainingError:
    """The one-line error for LDS retrainings whose loss became non-finite. Such a model has no
    measurement: its row stays unwritten rather than NaN (which would read as "not trained yet"
    and be retrained on every resume)."""
    which, together = f"LDS model {models[0]}", ""
    if len(models) > 1:
        which, together = f"one of LDS models {', '.join(map(str, models))}", ", trained together"
    at = f" at step {err.step}" if hasattr(err, "step") else ""
    return TrainingError(f"{which} ({removal} removal, keep {keep:g}{together}) diverged: "
                         f"non-finite loss{at}; {_advice(removal)}")


def checked_row(row: np.ndarray, model: int, targets: list[int], removal: str,
                keep: float) -> np.ndarray:
    """``row`` if every measurement is finite; a NaN row would be stored as "not trained yet"."""
    bad = np.flatnonzero(~np.isfinite(row))
    if bad.size:
        raise TrainingError(f"LDS model {model} ({removal} removal, keep {keep:g}) measured "
                            f"{row[bad[0]]} on test {targets[bad[0]]}: a non-finite measurement "
                            f"(the model diverged); {_advice(removal)}")
    return row


def run_lds(recipe: Recipe, store, models: int, keep: float, targets: Optional[list[int]],
            removal: str = "weight", mask_seed: int = 0, models_per_batch: int = 0):
    """Returns (result, predicted (M, K), measured (M, K)) for the chosen targets."""
    check_lds_arguments(models, keep, removal, mask_seed, models_per_batch, recipe.num_train)
    kind = recipe.cfg.measure.kind
    scores, targets, scored = scores_of(recipe, store, targets)
    masks = subset_masks(recipe.num_train, models, keep, mask_seed)
    group = lds_group(recipe, removal, keep)
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
            try:
                if per_batch == 1:
                    finals = [retrain_subset(recipe, masks[chunk[0]], removal, start)]
                else:
                    st = train_many(recipe, torch.from_numpy(masks[chunk].astype(np.float64)),
                                    start=start)
                    finals = list(zip(st.theta, st.buffers))
            except TrainingError as err:
                raise diverged(chunk, removal, keep, err) from None
            for j, (theta, buffers) in zip(chunk, finals):
                row = measure(recipe, theta, buffers, scored, kind).cpu().numpy()
                store.write_lds_row(group, j, checked_row(row, j, scored, removal, keep))
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
    stats = lds_statistics(scores, masks, measured)
    result = LdsResult(stats.mean, stats.ci,
                       {"index": targets, "lds": [float(x) for x in stats.per_target]},
                       keep, models, removal, seconds, CI_METHOD, stats.bias_corrected)
    store.write_lds_result(group, result.to_json())
    return result, masks.astype(np.float64) @ scores.T, measured
