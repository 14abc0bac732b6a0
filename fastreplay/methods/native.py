"""The methods fastreplay computes itself: its exact scores, and gradient similarity."""
from __future__ import annotations

import numpy as np

from .base import Method, PeerContext, register


def magic(ctx: PeerContext, targets: list) -> np.ndarray:
    """The exact scores `fastreplay magic` stored for these targets."""
    from ..workflows.lds import scores_of
    return scores_of(ctx.recipe, ctx.store, targets).scores


def gradient_similarity(ctx: PeerContext, targets: list) -> np.ndarray:
    """-<grad loss_i, grad phi_k> at the final parameters: one more SGD step on example i moves
    the measurement by -lr <grad loss_i, grad phi_k>, the score's sign up to lr > 0 (TracIn at
    the last checkpoint, TRAK without projection or ensembling)."""
    from ..core.measure import measurement_grads
    from ..core.train import load_final
    from ..workflows.baselines import gradient_similarities
    final = load_final(ctx.recipe, ctx.store)
    _, directions, _ = measurement_grads(ctx.recipe, final.theta, final.buffers, targets,
                                         ctx.kind)
    return -np.stack([gradient_similarities(ctx.recipe, final.theta, final.buffers, d)
                      for d in directions])


register(Method("magic", "MAGIC (fastreplay, exact)", magic,
                notes="the exact derivative of the run over its attribution window; stored by "
                      "`fastreplay magic` (its replay time: magic_summary.json)"))
register(Method("gradsim", "gradient similarity", gradient_similarity,
                notes="final parameters, every layer, no projection"))
