"""`fastreplay smoothness`: is this recipe predictable enough for scores to mean anything?

A cheap check before paying for 100 LDS retrainings: four trainings of the attribution window
instead of M.
1. determinism (one training): retraining from the start of the attribution window must land bit
   for bit on the stored final state, else the scores are not the derivative of the stored run;
2. linearity along an LDS-like direction v = -1_R (R: a random (1 - keep) fraction of the data;
   three trainings, in one batch where the models can be batched): train at w = 1 (the baseline,
   batched like the others) and w = 1 + h v for h = 1/2 and 1, and compare the measured change of
   every measurement with the scores' first-order prediction h <tau, v>.
Agreement per measurement is 1 - |actual - predicted| / max(|actual|, |predicted|) (1 = perfect,
0 = unrelated or opposite); the score is its median over measurements and passes at >= 0.5.
The curvature ratio actual(h=1) / (2 actual(h=1/2)) should be near 1 for a smooth run.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from .arguments import check_smoothness_arguments
from .lds import stored_scores
from .measure import measure
from .multitrain import train_many
from .recipe import Recipe
from .train import load_final, run_steps, window_start

PASS_THRESHOLD = 0.5


@dataclass
class SmoothnessReport:
    deterministic: bool
    score: float
    passed: bool
    spearman_predicted_vs_actual: float
    median_curvature_ratio: float
    keep: float
    targets: list
    predicted: list
    actual_half: list
    actual_full: list

    def to_json(self) -> dict:
        return asdict(self)


def check_smoothness(recipe: Recipe, store, keep: float = 0.99, seed: int = 0) -> SmoothnessReport:
    from scipy.stats import spearmanr

    check_smoothness_arguments(keep, seed)
    kind = recipe.cfg.measure.kind
    scores, targets = stored_scores(recipe, store)
    final = load_final(recipe, store)

    start = window_start(recipe, store)
    again = run_steps(recipe, start.clone(), recipe.ones(), recipe.num_steps, description="retrain")
    deterministic = bool(torch.equal(again.theta, final.theta)
                         and torch.equal(again.buffers, final.buffers))

    n = recipe.num_train
    removed = np.random.default_rng([seed, 0x5E]).permutation(n)[:max(1, int(round((1 - keep) * n)))]
    v = np.zeros(n)
    v[removed] = -1.0
    # The unperturbed run is trained in the same batch, so rounding differences between the
    # batched and the one-model kernels cannot pose as a response to the weights.
    weights = torch.from_numpy(np.stack([np.ones(n), 1 + 0.5 * v, 1 + v]))
    runs = train_many(recipe, weights, start=start)
    base, at_half, at_full = (measure(recipe, runs.theta[j], runs.buffers[j], targets, kind)
                              .cpu().numpy() for j in range(3))
    half, full = at_half - base, at_full - base
    predicted = scores @ v
    agree = 1 - np.abs(full - predicted) / np.maximum(np.maximum(np.abs(full), np.abs(predicted)), 1e-30)
    with np.errstate(divide="ignore", invalid="ignore"):
        curvature = full / (2 * half)
    score = float(np.median(agree))
    rho = float(spearmanr(predicted, full).statistic) if len(targets) > 2 else float("nan")
    return SmoothnessReport(deterministic, score, deterministic and score >= PASS_THRESHOLD, rho,
                            float(np.nanmedian(curvature)), keep, targets,
                            predicted.tolist(), half.tolist(), full.tolist())
