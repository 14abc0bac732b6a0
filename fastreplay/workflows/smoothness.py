"""`fastreplay smoothness`: is this recipe predictable enough for scores to mean anything?

A cheap check before paying for 100 LDS retrainings: four trainings of the attribution window
(three where the models cannot be batched) instead of M, and no replay at all unless scores are
already stored.
1. determinism (one training): retraining from the start of the attribution window must land bit
   for bit on the stored final state, else the scores are not the derivative of the stored run;
2. three trainings along an LDS-like direction v = -1_R (R: a random (1 - keep) fraction of the
   data; in one batch where the models can be batched): w = 1 (the baseline, batched like the
   others; one model at a time it is the determinism retraining) and w = 1 + h v for h = 1/2
   and 1. From their final parameters theta_0, theta_h, theta_2h comes the metasmoothness S of
   Engstrom et al. 2025 ("Optimizing ML Training with Metagradient Descent", Definition 2):
   with d = |theta_2h - theta_0|,
   S = sum_i d_i / ||d||_1 * sign(theta_h - theta_0)_i * sign(theta_2h - theta_h)_i in [-1, 1]:
   1 when every parameter moves on along the same path (a smooth response), ~0 when the second
   step is unrelated to the first (chaos). It needs no scores, so it screens a recipe after
   training alone.
3. with stored scores: every measurement's change against the scores' first-order prediction
   h <tau, v>. Agreement per measurement is 1 - |actual - predicted| / max(|actual|, |predicted|)
   (1 = perfect, 0 = unrelated or opposite); the score is its median over measurements and passes
   at >= 0.5. The curvature ratio actual(h=1) / (2 actual(h=1/2)) should be near 1 for a smooth
   run. Without stored scores the measurements are those of ``targets`` and only the
   score-free figures (determinism, S, the curvature ratio) are reported.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

from ..config import score_name
from ..core.measure import measure
from ..core.multitrain import can_batch_models, train_many
from ..core.recipe import Recipe, TrainState
from ..core.train import load_final, run_steps, window_start
from ..interface.arguments import check_smoothness_arguments
from .lds import scores_of

PASS_THRESHOLD = 0.5
DEFAULT_UNSCORED_TARGETS = 8
"""Without stored scores, the first this-many test examples are measured (curvature ratio)."""


@dataclass
class SmoothnessReport:
    deterministic: bool
    metasmoothness: float
    """S of Engstrom et al. 2025 over the parameters, in [-1, 1] (module docstring)."""
    score: Optional[float]
    """Median agreement of the scores' prediction with the measured change; None unscored."""
    passed: Optional[bool]
    """deterministic and score >= PASS_THRESHOLD; None without stored scores."""
    spearman_predicted_vs_actual: Optional[float]
    median_curvature_ratio: float
    keep: float
    scored: bool
    targets: list
    predicted: Optional[list]
    actual_half: list
    actual_full: list

    def to_json(self) -> dict:
        return asdict(self)


def metasmoothness(theta_0: torch.Tensor, theta_h: torch.Tensor, theta_2h: torch.Tensor) -> float:
    """S = sum_i d_i / ||d||_1 sign(theta_h - theta_0)_i sign(theta_2h - theta_h)_i with
    d = |theta_2h - theta_0| (Engstrom et al. 2025, Definition 2), in float64: the d-weighted
    fraction of parameters whose second step continues the first, minus those that turn back.
    NaN when the perturbation moved nothing (the direction does not reach the run)."""
    a, b, c = (t.detach().to(torch.float64) for t in (theta_0, theta_h, theta_2h))
    d = (c - a).abs()
    total = d.sum()
    if total == 0:
        return float("nan")
    return float((d * torch.sign(b - a) * torch.sign(c - b)).sum() / total)


def check_smoothness(recipe: Recipe, store, keep: float = 0.99, seed: int = 0,
                     targets: Optional[list[int]] = None) -> SmoothnessReport:
    """The report of the module docstring. With stored scores their targets are measured
    (``targets``, when given, must be among them); without, ``targets`` (default: the first
    DEFAULT_UNSCORED_TARGETS test examples) and no score is formed."""
    from scipy.stats import spearmanr

    check_smoothness_arguments(keep, seed)
    kind = recipe.cfg.measure.kind
    scores, targets = _scores_for(recipe, store, targets)
    final = load_final(recipe, store)

    start = window_start(recipe, store)
    again = run_steps(recipe, start.clone(), recipe.ones(), recipe.num_steps, description="retrain")
    deterministic = bool(torch.equal(again.theta, final.theta)
                         and torch.equal(again.buffers, final.buffers))

    n = recipe.num_train
    removed = np.random.default_rng([seed, 0x5E]).permutation(n)[:max(1, int(round((1 - keep) * n)))]
    v = np.zeros(n)
    v[removed] = -1.0
    runs = _probe_runs(recipe, start, again, torch.from_numpy(np.stack([1 + 0.5 * v, 1 + v])))
    s = metasmoothness(runs.theta[0], runs.theta[1], runs.theta[2])
    base, at_half, at_full = (measure(recipe, runs.theta[j], runs.buffers[j], targets, kind)
                              .cpu().numpy() for j in range(3))
    half, full = at_half - base, at_full - base
    with np.errstate(divide="ignore", invalid="ignore"):
        curvature = float(np.nanmedian(full / (2 * half)))
    if scores is None:
        return SmoothnessReport(deterministic, s, None, None, None, curvature, keep, False,
                                targets, None, half.tolist(), full.tolist())
    predicted = scores @ v
    agree = 1 - np.abs(full - predicted) / np.maximum(np.maximum(np.abs(full), np.abs(predicted)), 1e-30)
    score = float(np.median(agree))
    rho = float(spearmanr(predicted, full).statistic) if len(targets) > 2 else float("nan")
    return SmoothnessReport(deterministic, s, score, deterministic and score >= PASS_THRESHOLD, rho,
                            curvature, keep, True, targets, predicted.tolist(), half.tolist(),
                            full.tolist())


def _probe_runs(recipe: Recipe, start, baseline, perturbed: torch.Tensor):
    """Final states of the unperturbed run and the ``perturbed`` weights, stacked (3, ...).
    Where the models are batched, the unperturbed run is trained in the same batch, so rounding
    differences between the batched and the one-model kernels cannot pose as a response to the
    weights; one model at a time, the determinism retraining already is that run (same kernels),
    which saves one training of the five."""
    if can_batch_models(recipe):
        ones = torch.ones(1, recipe.num_train, dtype=perturbed.dtype)
        return train_many(recipe, torch.cat([ones, perturbed]), start=start)
    runs = train_many(recipe, perturbed, start=start)
    return TrainState(*(torch.cat([getattr(baseline, k)[None].to(getattr(runs, k).device),
                                   getattr(runs, k)])
                        for k in ("theta", "opt_state", "buffers")), runs.step)


def _scores_for(recipe: Recipe, store, targets: Optional[list[int]]):
    """(scores of the measured targets or None, the targets) as check_smoothness describes."""
    if score_name(recipe.cfg) in store.score_names():
        chosen = scores_of(recipe, store, targets)
        return chosen.scores, chosen.targets
    if targets is None:
        targets = list(range(min(DEFAULT_UNSCORED_TARGETS, recipe.data.num_test)))
    return None, targets
