"""Learning rates and weight decays of a run, per step and parameter group, resolved once from
the config (train.lr, train.schedule, train.lr_convention, train.bias_lr_scale) for whichever
optimizer the run uses.
"""
from __future__ import annotations

import numpy as np

from ..config import TrainConfig


def airbench_scale(momentum: float) -> float:
    """airbench94's "kilostep scale" 1024 (1 + 1/(1 - mu)): its lr and weight decay are per
    1024 examples, and Nesterov momentum's step on a constant gradient is (1 + 1/(1 - mu))
    times that gradient, which this divides out."""
    return 1024 * (1 + 1 / (1 - momentum))


def mean_loss_lr_and_decay(t: TrainConfig) -> tuple[float, float]:
    """(peak eta, lambda) of this package's mean-loss step for train.lr and train.weight_decay.

    lr_convention=mean: they are eta and lambda themselves. lr_convention=airbench converts
    airbench94's optimizer once: torch SGD on the SUMMED loss B L_mean with group lr
    alpha_g = f_t lr s_g / S and coupled weight_decay kappa_g = (wd B / S) / (lr s_g / S)
    (S = airbench_scale, s_g the group's lr multiplier, f_t the schedule factor, which scales
    alpha but not kappa). With the momentum buffer m = buf / B its step is ours with
    eta_g = B alpha_g = f_t s_g (lr B / S) and lambda_g = kappa_g / B = wd / (lr s_g), so
    eta_g lambda_g = f_t wd B / S: the decay per step is independent of lr, as airbench
    intends. For the decay group (s = 1): peak eta = lr B / S and lambda = wd / lr.
    """
    if t.lr_convention == "mean":
        return t.lr, t.weight_decay
    peak = t.lr * t.batch_size / airbench_scale(t.momentum)
    return peak, t.weight_decay / t.lr


def weight_decays(t: TrainConfig, num_groups: int) -> list[float]:
    """lambda per parameter group: the decay group's, and 0 for the no-decay group (biases and
    BatchNorm parameters; airbench also decays its BatchNorm biases, which this does not)."""
    return [mean_loss_lr_and_decay(t)[1], 0.0][:num_groups]


def lr_table(t: TrainConfig, num_steps: int, num_groups: int) -> np.ndarray:
    """(T, groups) learning rates: the schedule's factor times the peak eta (train.lr, converted
    by mean_loss_lr_and_decay under lr_convention=airbench) times the group scale."""
    s = np.arange(num_steps, dtype=np.float64)
    if t.schedule == "constant":
        factor = np.ones(num_steps)
    else:  # linear start->peak over peak_at of training, then peak->end
        peak = max(1.0, t.peak_at * num_steps)
        up = t.start_factor + (1 - t.start_factor) * s / peak
        progress = (s - peak) / max(1.0, num_steps - peak)
        if t.schedule == "onecycle":  # linear decay
            down = 1 + (t.end_factor - 1) * progress
        else:  # cosine decay, as transformers' get_cosine_schedule_with_warmup (end_factor 0)
            down = t.end_factor + (1 - t.end_factor) * 0.5 * (1 + np.cos(np.pi * progress))
        factor = np.where(s < peak, up, down)
    scales = [1.0, t.bias_lr_scale][:num_groups]
    peak_eta = mean_loss_lr_and_decay(t)[0]
    return peak_eta * factor[:, None] * np.asarray(scales)[None, :]


def group_schedule(t: TrainConfig, num_steps: int, group_ends) -> tuple:
    """(group_ends, lrs, wds) of a run, as every optimizer holds them: the groups' cumulative
    ends as ints, the (T, groups) learning-rate table and the per-group weight decays."""
    groups = len(group_ends)
    return (tuple(int(e) for e in group_ends), lr_table(t, num_steps, groups),
            tuple(weight_decays(t, groups)))
