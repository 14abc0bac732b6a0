"""The peers through their own libraries (`pip install 'fastreplay[peers]'`, pinned: traker
0.3.2, kronfluence 1.0.1, dattri 0.3.0), each at its documented defaults, each output turned
into fastreplay's convention once. All three libraries return "positive = helpful" (measured on
the digits example against the exact scores): every wrapper negates, and TRAK's and dattri's
(N, K) matrices are transposed.

The fixes applied are the ones these versions need to give their own answer at all, never a
tuning (each stated in the method's notes):

* traker: a fresh save_dir per call with load_from_save_dir=True (False breaks scoring, a reused
  directory silently keeps another model's features); device set to the run's (its default is
  cuda);
* kronfluence: scores read with load_pairwise_scores (compute_pairwise_scores returns None on a
  fresh run); a fresh output directory; torch seeded for its sampled Fisher labels; it tracks
  nn.Linear and nn.Conv2d only, so BatchNorm, LayerNorm and embeddings are left out;
* dattri influence functions: the training set cached as ONE batch (its attributors sum
  per-batch inverse-Hessian products), the output checked to be finite (CG divides 0/0 once its
  residual reaches 0); TracIn over the stored checkpoints weighted by their learning rates,
  without its default random projection (set on the instance: passing projector_kwargs mutates
  a module-level default).
"""
from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from ..exceptions import ConfigError, ReplayError
from .base import Method, PeerContext, register

TRAIN_BATCH = 256


@contextlib.contextmanager
def quiet_progress():
    """The libraries draw tqdm bars on stderr for every pass; a table is what compare shows."""
    import os
    before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = before


@contextlib.contextmanager
def _scratch(prefix: str):
    """A fresh directory for a library's files, removed afterwards (fastreplay made it)."""
    path = tempfile.mkdtemp(prefix=f"fastreplay-{prefix}-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _finite(name: str, scores: np.ndarray, targets: list) -> np.ndarray:
    bad = [t for t, row in zip(targets, scores) if not np.isfinite(row).all()]
    if bad:
        raise ReplayError(f"{name} returned non-finite scores for targets {bad[:5]} (a solver "
                          "that diverged or divided 0/0); leave the method out or change its "
                          "settings")
    return scores


def _need_classification(ctx: PeerContext, name: str) -> None:
    if not ctx.classification():
        raise ConfigError(f"{name} is set up here for classification (class labels under the "
                          "built-in cross-entropy); this task's targets are not: leave it out")


# --- TRAK (traker) -----------------------------------------------------------------------------

def trak(ctx: PeerContext, targets: list, **options) -> np.ndarray:
    """``options``: TRAKer keyword arguments (none in `compare`: its defaults)."""
    from trak import TRAKer
    _need_classification(ctx, "trak")
    model = ctx.module()
    train_x, train_y = ctx.train_data()
    test_x, test_y = ctx.test_data(targets)
    n, k = len(train_x), len(targets)
    with _scratch("trak") as save_dir:
        traker = TRAKer(model=model, task="image_classification", train_set_size=n,
                        save_dir=save_dir, device=str(ctx.device),
                        logging_level=logging.ERROR, **options)
        traker.load_checkpoint(model.state_dict(), model_id=0)
        for lo in range(0, n, TRAIN_BATCH):
            hi = min(lo + TRAIN_BATCH, n)
            traker.featurize(batch=(train_x[lo:hi], train_y[lo:hi]), num_samples=hi - lo)
        traker.finalize_features()
        traker.start_scoring_checkpoint(exp_name="targets", checkpoint=model.state_dict(),
                                        model_id=0, num_targets=k)
        traker.score(batch=(test_x, test_y), num_samples=k)
        scores = np.array(traker.finalize_scores(exp_name="targets"), dtype=np.float64)
    return _finite("trak", -scores.T, targets)


# --- EK-FAC and K-FAC (kronfluence) -----------------------------------------------------------

def _kronfluence(ctx: PeerContext, targets: list, strategy: str) -> np.ndarray:
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    class RunTask(Task):
        """The run's own loss (summed, as kronfluence wants) and measurement."""

        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            outputs = model(x)
            if sample and ctx.classification():  # the true Fisher: labels drawn from the model
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(outputs.detach(), -1), 1).flatten()
            return ctx.loss(outputs, y).sum()

        def compute_measurement(self, batch, model):
            x, y = batch
            return ctx.measurement(model(x), y).sum()

    task = RunTask()
    model = prepare_model(ctx.module(), task)
    train = TensorDataset(*ctx.train_data())
    query = TensorDataset(*ctx.test_data(targets))
    with _scratch(strategy) as out, torch.random.fork_rng(
            devices=[ctx.device] if ctx.device.type == "cuda" else []):
        torch.manual_seed(0)  # the sampled labels of its true Fisher
        analyzer = Analyzer(analysis_name="compare", model=model, task=task,
                            cpu=ctx.device.type == "cpu", disable_tqdm=True, output_dir=out,
                            log_level=logging.ERROR)
        batch = min(len(train), 1024)
        analyzer.fit_all_factors(factors_name=strategy, dataset=train,
                                 factor_args=FactorArguments(strategy=strategy),
                                 per_device_batch_size=batch)
        analyzer.compute_pairwise_scores(scores_name=strategy, factors_name=strategy,
                                         query_dataset=query, train_dataset=train,
                                         per_device_query_batch_size=len(targets),
                                         per_device_train_batch_size=batch,
                                         score_args=ScoreArguments())
        scores = analyzer.load_pairwise_scores(scores_name=strategy)["all_modules"]
    return _finite(strategy, -scores.double().cpu().numpy(), targets)


def ekfac(ctx: PeerContext, targets: list) -> np.ndarray:
    return _kronfluence(ctx, targets, "ekfac")


def kfac(ctx: PeerContext, targets: list) -> np.ndarray:
    return _kronfluence(ctx, targets, "kfac")


# --- influence functions and TracIn (dattri) ------------------------------------------------------

def _dattri_task(ctx: PeerContext, checkpoints=None):
    from dattri.task import AttributionTask
    model = ctx.module()
    example_dims = ctx.recipe.data.train_x.dim() - 1  # the dims of one example's inputs

    def loss(params, data):
        x, y = data
        if x.dim() == example_dims:  # TracIn passes single examples
            x, y = x[None], y.reshape(1, *y.shape)
        if ctx.classification():
            y = y.long()  # LiSSA's collate makes every tensor float, labels included
        outputs = torch.func.functional_call(model, params, (x,))
        return ctx.loss(outputs, y).mean()

    return AttributionTask(loss_func=loss, model=model,
                           checkpoints=checkpoints if checkpoints is not None else model.state_dict())


def _loaders(ctx: PeerContext, targets: list, train_batch: int):
    x, y = ctx.train_data()
    train = DataLoader(TensorDataset(x, y), batch_size=train_batch, shuffle=False)
    test = DataLoader(TensorDataset(*ctx.test_data(targets)), batch_size=len(targets),
                      shuffle=False)
    return train, test


def _influence(ctx: PeerContext, targets: list, cls, name: str) -> np.ndarray:
    attributor = cls(task=_dattri_task(ctx), device=str(ctx.device))
    train, test = _loaders(ctx, targets, ctx.recipe.num_train)  # ONE batch: see the docstring
    with quiet_progress():
        attributor.cache(train)
        scores = attributor.attribute(train, test).detach().double().cpu().numpy()
    return _finite(name, -scores.T, targets)


def influence_cg(ctx: PeerContext, targets: list) -> np.ndarray:
    from dattri.algorithm.influence_function import IFAttributorCG
    return _influence(ctx, targets, IFAttributorCG, "if")


def influence_lissa(ctx: PeerContext, targets: list) -> np.ndarray:
    from dattri.algorithm.influence_function import IFAttributorLiSSA
    return _influence(ctx, targets, IFAttributorLiSSA, "if-lissa")


def tracin(ctx: PeerContext, targets: list) -> np.ndarray:
    from dattri.algorithm.tracin import TracInAttributor
    checkpoints = ctx.checkpoints()
    attributor = TracInAttributor(
        task=_dattri_task(ctx, [c[1] for c in checkpoints]),
        weight_list=torch.tensor([c[2] for c in checkpoints], dtype=torch.float32),
        normalized_grad=False, device=str(ctx.device))
    attributor.projector_kwargs = None  # exact dot products, not its default random projection
    train, test = _loaders(ctx, targets, TRAIN_BATCH)
    with quiet_progress():
        scores = attributor.attribute(train, test).detach().double().cpu().numpy()
    return _finite("tracin", -scores.T, targets)


register(Method("trak", "TRAK (traker, defaults)", trak, "trak",
                "one model, proj_dim 2048 (its default; no better than noise where the training "
                "set is not much larger), float16 features, every layer"))
register(Method("ekfac", "EK-FAC (kronfluence, defaults)", ekfac, "kronfluence",
                "nn.Linear and nn.Conv2d only: BatchNorm, LayerNorm and embeddings ignored; true "
                "Fisher (sampled labels) for classification, damping heuristic"))
register(Method("kfac", "K-FAC (kronfluence, defaults)", kfac, "kronfluence",
                "nn.Linear and nn.Conv2d only: BatchNorm, LayerNorm and embeddings ignored"))
register(Method("if", "influence functions, CG (dattri, defaults)", influence_cg, "dattri",
                "final parameters, 10 CG iterations, no damping; the training set as one batch "
                "(its memory grows with it: out of memory for the LM example on 24 GB)"))
register(Method("if-lissa", "influence functions, LiSSA (dattri, defaults)", influence_lissa,
                "dattri", "final parameters; its default scaling can diverge"))
register(Method("tracin", "TracIn (dattri)", tracin, "dattri",
                "the stored checkpoints of the attribution window weighted by their learning "
                "rates, exact dot products (its default projection turned off)"))
