"""Does the LDS interval cover? A simulation with a known population LDS.

K targets, each with its own population of "models": a predicted value x ~ N(0, 1) and a measured
value y = x + 0.2 x^2 + heavy-tailed noise (Student t, 3 degrees of freedom), the noise scaled per
target so that the per-target Spearman rho spreads over 0.86-0.97, like the per-target LDS of real
runs. The population LDS (the mean over targets of rho as M -> infinity) is taken from 200,000
models per target (its sampling error, ~1e-4, is small next to the intervals' width, ~0.02); each
repetition draws M = 100 models, as `fastreplay lds` does, and asks whether the reported 95%
interval contains it. At this M the sample rho is biased towards 0 by about one standard error of
the mean over 20 targets, which is what the old percentile bootstrap over models missed.
"""
from __future__ import annotations

import numpy as np

from fastreplay.workflows.lds import lds_statistics, spearman_rows

K, M, REPS = 20, 100, 200
OLD_RESAMPLES = 50  # its failure is a bias, not resampling noise: 50 resamples show it


def draw_models(noise_scale: np.ndarray, m: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(m, K) predicted and measured values: monotone-nonlinear response plus heavy-tailed noise."""
    x = rng.standard_normal((m, len(noise_scale)))
    noise = rng.standard_t(3, (m, len(noise_scale))) / np.sqrt(3)
    return x, x + 0.2 * x ** 2 + noise_scale * noise


def reported_interval(pred: np.ndarray, actual: np.ndarray) -> list:
    """The interval `fastreplay lds` reports: with one model per "training example" and the
    identity as subsets, the summed scores are ``pred`` itself."""
    return lds_statistics(pred.T, np.eye(len(pred), dtype=bool), actual)[2]


def old_percentile_interval(pred, actual, rng, resamples=OLD_RESAMPLES) -> list:
    """The interval `fastreplay lds` used to report: percentiles of the mean rho over models
    resampled with replacement (vectorised: every resample of every target at once)."""
    j = rng.integers(0, len(pred), (resamples, len(pred)))
    rho = spearman_rows(pred[j].transpose(1, 0, 2).reshape(len(pred), -1),
                        actual[j].transpose(1, 0, 2).reshape(len(pred), -1))
    return list(np.percentile(rho.reshape(resamples, -1).mean(1), [2.5, 97.5]))


def test_lds_interval_covers_the_population_value_and_the_old_one_did_not():
    rng = np.random.default_rng(2024)
    rho = rng.uniform(0.85, 0.97, K)
    noise_scale = np.sqrt(1 - rho ** 2) / rho
    truth = np.mean(spearman_rows(*draw_models(noise_scale, 200_000, rng)))

    covered = {"reported": 0, "old percentile": 0}
    for _ in range(REPS):
        pred, actual = draw_models(noise_scale, M, rng)
        lo, hi = reported_interval(pred, actual)
        covered["reported"] += lo <= truth <= hi
        old_lo, old_hi = old_percentile_interval(pred, actual, rng)
        covered["old percentile"] += old_lo <= truth <= old_hi
    coverage = {k: round(v / REPS, 3) for k, v in covered.items()}
    print(f"population LDS {truth:.4f}; coverage of 95% intervals over {REPS} draws: {coverage}")
    # Measured: reported (jackknife) 0.96, old percentile reference 0.675; the old lds_statistics
    # itself (1000 resamples) in the place of the reported interval: 0.74, failing this test.
    assert 0.90 <= coverage["reported"] <= 0.99, coverage
    # The same test fails the old interval: biased replicates put it below the population value.
    assert coverage["old percentile"] < 0.85, coverage


def test_reported_interval_is_deterministic_and_centred_on_the_bias_corrected_mean():
    rng = np.random.default_rng(0)
    pred, actual = draw_models(np.full(5, 0.3), 30, rng)
    stats = lds_statistics(pred.T, np.eye(30, dtype=bool), actual)
    assert stats.ci == lds_statistics(pred.T, np.eye(30, dtype=bool), actual).ci
    assert stats.ci[0] < stats.bias_corrected < stats.ci[1]
    assert np.isclose(stats.bias_corrected, sum(stats.ci) / 2)
    assert stats.mean == np.mean(stats.per_target)
