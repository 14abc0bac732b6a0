"""The facade the CLI and users call: train-or-reuse a stored run, score targets, retrain.

Layers (kronfluence-style): api (this) -> train / replay / store -> recipe, models, kernels.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .config import RunConfig, to_toml
from .exceptions import ConfigError, StoreError
from .measure import accuracy, measure
from .plots import influence_figure
from .progress import log
from .recipe import Recipe
from .replay import replay
from .store import RunStore, versions
from .train import load_final, train, train_into_store

STORE_NAME = "run.zarr"


@dataclass
class MagicResult:
    targets: list[int]
    scores: np.ndarray
    values: np.ndarray
    accuracy: float
    train_seconds: Optional[float]
    replay_seconds: float
    replayed: int
    store_bytes: int
    peak_gpu_bytes: Optional[int]
    plots: list[str] = field(default_factory=list)
    run_dir: str = ""


def store_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / STORE_NAME


def open_or_train(cfg: RunConfig, run_dir: str | Path, force: bool = False,
                  download: bool = False) -> tuple[Recipe, RunStore]:
    """A store holding a finished run of ``cfg``: reused when present, else trained (or resumed)."""
    path = store_path(run_dir)
    recipe = Recipe(cfg, download=download)
    if force and RunStore.exists(path):
        log.info("--force: removing the existing run store %s", path)
        shutil.rmtree(path)
    if RunStore.exists(path):
        store = RunStore.open(path)
        if store.fingerprint != cfg.fingerprint():
            raise StoreError(f"{path} holds a run of a different config (fingerprint "
                             f"{store.fingerprint} != {cfg.fingerprint()}); use another --run-dir "
                             "or --force to discard it")
    else:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        store = RunStore.create(path, cfg.to_dict(), cfg.fingerprint(), versions())
        store.set_attr("step_backend", recipe.step_backend)
    (Path(run_dir) / "config.toml").write_text(to_toml(cfg))
    if store.status in ("trained", "cleaned"):
        log.info("reusing the trained run in %s", path)
        return recipe, store
    state, seconds = train_into_store(recipe, store)
    acc = accuracy(recipe, state.theta, state.buffers)
    store.set_attr("train_seconds", seconds)
    store.set_attr("test_accuracy", acc)
    log.info("trained %d steps in %.1fs, test accuracy %.2f%%; run stored in %s",
             recipe.num_steps, seconds, 100 * acc, path)
    return recipe, store


def _merge_scores(store: RunStore, kind: str, targets: list[int], recipe: Recipe):
    """Scores for ``targets``, computing only those the store does not hold yet."""
    name = kind
    have: dict[int, np.ndarray] = {}
    if name in store.score_names():
        old, attrs = store.read_scores(name)
        have = {int(t): old[i] for i, t in enumerate(attrs["targets"])}
    missing = [t for t in targets if t not in have]
    seconds = 0.0
    if missing and store.status == "cleaned":
        raise StoreError(f"the checkpoints of {store.path} were cleaned, so targets {missing[:5]} "
                         "cannot be replayed; rerun with --force to retrain")
    if missing:
        b = recipe.cfg.replay.target_batch
        for lo in range(0, len(missing), b):
            chunk = missing[lo:lo + b]
            res = replay(recipe, store, chunk, kind)
            seconds += res.seconds
            peak = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
                    if recipe.device.type == "cuda" else "")
            log.info("replayed targets %s in %.1fs%s", chunk, res.seconds, peak)
            have.update({t: res.scores[i] for i, t in enumerate(chunk)})
            all_t = sorted(have)
            store.write_scores(name, np.stack([have[t] for t in all_t]), all_t, kind,
                               {"start_step": recipe.cfg.replay.start_step})
        log.info("replayed %d target(s) in %.1fs (%.2fs each)", len(missing), seconds,
                 seconds / len(missing))
    else:
        log.info("all %d target(s) already scored in the store", len(targets))
    return np.stack([have[t] for t in targets]), seconds, len(missing)


def run_magic(cfg: RunConfig, targets: list[int], run_dir: str | Path, force: bool = False,
              download: bool = False, scores_out: Optional[str] = None,
              plots: bool = True) -> MagicResult:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    recipe, store = open_or_train(cfg, run_dir, force, download)
    final = load_final(recipe, store)
    kind = cfg.measure.kind
    scores, seconds, replayed = _merge_scores(store, kind, targets, recipe)
    values = measure(recipe, final.theta, final.buffers, targets, kind).cpu().numpy()
    store.flush()
    result = MagicResult(targets, scores, values, float(store.get_attr("test_accuracy", float("nan"))),
                         store.get_attr("train_seconds"), seconds, replayed, store.nbytes_on_disk(),
                         torch.cuda.max_memory_allocated() if recipe.device.type == "cuda" else None,
                         run_dir=str(run_dir))
    if scores_out:
        np.save(scores_out, scores)
        log.info("scores (%d targets x %d examples) written to %s", *scores.shape, scores_out)
    if plots:
        data = recipe.data
        train_x, train_y = data.train_x.cpu().numpy(), data.train_y.cpu().numpy()
        for k, t in enumerate(targets):
            path = influence_figure(Path(run_dir) / "plots" / f"target_{t:05d}.png", t,
                                    data.test_x[t].cpu().numpy(), int(data.test_y[t]), scores[k],
                                    train_x, train_y, data.class_names, kind, float(values[k]))
            result.plots.append(str(path))
        log.info("influence plots written to %s", Path(run_dir) / "plots")
    (Path(run_dir) / "magic_summary.json").write_text(json.dumps(summary(result), indent=2))
    store.close()
    return result


def summary(res: MagicResult) -> dict:
    return {"targets": res.targets, "test_accuracy": res.accuracy,
            "train_seconds": res.train_seconds, "replay_seconds": res.replay_seconds,
            "replayed_targets": res.replayed,
            "replay_seconds_per_target": res.replay_seconds / max(1, res.replayed),
            "store_bytes": res.store_bytes, "peak_gpu_bytes": res.peak_gpu_bytes,
            "run_dir": res.run_dir, "plots": res.plots}


def counterfactual(cfg: RunConfig, weights: np.ndarray, targets: list[int],
                   download: bool = False, recipe: Optional[Recipe] = None) -> np.ndarray:
    """Retrain with per-example ``weights`` and return the measurements of ``targets``."""
    recipe = recipe or Recipe(cfg, download=download)
    weights = np.asarray(weights)
    if weights.ndim != 1 or len(weights) != recipe.num_train:
        raise ConfigError(f"weights have shape {weights.shape} but the run has {recipe.num_train} "
                          "training examples: pass one weight per training example")
    if not np.all(np.isfinite(weights)):
        raise ConfigError("weights contain NaN or inf: pass finite per-example weights")
    w = torch.from_numpy(np.asarray(weights, dtype=np.float64)).to(recipe.device, recipe.dtype)
    t0 = time.perf_counter()
    state = train(recipe, w)
    log.debug("retrained in %.2fs", time.perf_counter() - t0)
    return measure(recipe, state.theta, state.buffers, targets, cfg.measure.kind).cpu().numpy()


def open_trained(run_dir: str | Path, download: bool = False) -> tuple[Recipe, RunStore]:
    """The recipe and store of a finished run, rebuilt from the config saved in the store."""
    from .config import config_from_dict
    path = store_path(run_dir)
    store = RunStore.open(path)
    cfg = config_from_dict(store.config)
    recipe = Recipe(cfg, download=download)
    load_final(recipe, store)  # refuses unfinished runs with a clear message
    return recipe, store


def run_lds_command(run_dir, models: int, keep: float, targets: Optional[str], removal: str,
                    mask_seed: int = 0, plots: bool = True):
    from .lds import run_lds
    from .measure import parse_targets
    from .plots import lds_figure
    recipe, store = open_trained(run_dir)
    ids = parse_targets(targets, recipe.data.num_test) if targets else None
    res, predicted, measured = run_lds(recipe, store, models, keep, ids, removal, mask_seed)
    if plots:
        path = lds_figure(Path(run_dir) / "plots" / f"lds_{removal}_keep{keep:g}.png", res,
                          predicted, measured)
        log.info("LDS plot written to %s", path)
    store.close()
    return res
