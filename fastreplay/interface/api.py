"""The facade the CLI and users call: train-or-reuse a stored run, score targets, retrain.

Layers (kronfluence-style): api (this) -> train / replay / store -> recipe, models, kernels.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..config import RunConfig, score_name, to_toml, with_values
from ..core.measure import group_name, measure
from ..core.recipe import ModelFactory, Recipe
from ..core.replay import replay
from ..core.train import load_final, train, train_into_store
from ..data import ImageData
from ..distributed import barrier, gather_all, gather_to_main, is_main, shard, world_size
from ..exceptions import ConfigError, StoreError
from ..faults import crash_point
from ..progress import log
from ..store import (
    DISCARDABLE,
    LOCK_NAME,
    STORE_NAME,
    Kind,
    RunDirLock,
    RunStore,
    check_remote,
    check_writable,
    discard_store,
    disk_errors,
    identify,
    is_remote,
    refusal,
    versions,
)
from ..store.inputs import ATTR as INPUTS_ATTR
from ..store.inputs import check_inputs, inputs_fingerprint
from ..store.paths import require_path_text, resolve_store_url
from ..store.rundir import remove_run_files, remove_text_temps, text_temp
from ..task import Task
from .arguments import check_lds_arguments, check_weights


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
    store: str = ""
    scores_out: Optional[str] = None
    """Where --scores-out put the scores (with the .npy suffix numpy.save adds)."""


def store_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / STORE_NAME


def store_location(run_dir: str | Path, store_url: str | None = None) -> str:
    """Where a run's Zarr group lives: ``store_url`` when given (a local path, a file:// URL,
    made a plain path, or an object-store URL such as ``s3://bucket/run.zarr``; any other scheme
    is refused, see paths.resolve_store_url), else RUN_DIR/run.zarr. The run directory itself
    (lock, config.toml, plots, summaries) is always local."""
    if store_url is None:
        return str(store_path(run_dir))
    return resolve_store_url(require_path_text(store_url, "--store"))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a small text file via a temporary name and a rename (never half-written)."""
    path = Path(path)
    tmp = text_temp(path)
    with disk_errors(str(path)):
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def lock_run_dir(run_dir: str | Path, create: bool = True,
                 store: str | None = None) -> RunDirLock:
    """Make sure ``run_dir`` exists and is writable, then take its exclusive lock (held until the
    store is closed or the process ends, however it ends). ``store`` (default RUN_DIR/run.zarr)
    is checked too: writable if local, reachable with its bucket and writable if remote."""
    run_dir = Path(require_path_text(run_dir, "--run-dir"))
    if run_dir.exists() and not run_dir.is_dir():
        raise StoreError(f"--run-dir {run_dir} is a file, not a directory; choose a directory")
    if create:
        with disk_errors(f"run directory {run_dir}"):
            run_dir.mkdir(parents=True, exist_ok=True)
    check_writable(run_dir)
    lock = RunDirLock(run_dir)
    try:
        path = store or str(store_path(run_dir))
        if is_remote(path):
            check_remote(path, write=True)
        elif Path(path).is_dir():
            check_writable(path)
        if lock.owner:
            remove_text_temps(run_dir)  # left by a write_text_atomic that was killed
    except BaseException:
        lock.release()
        raise
    return lock


def _open_locked(path: str, lock: RunDirLock) -> RunStore:
    """Open the store at ``path`` under the run directory's ``lock`` (kept in ``store.lock``)."""
    store = RunStore.open(path)
    store.lock = lock
    if lock.owner:
        store.remove_partial_files()  # left by a killed writer; we hold the lock
    return store


def _refuse_unusable_store(path: str, force: bool) -> None:
    """Refuse, before any work (no run directory created, no data loaded), a store location that
    holds something other than a run store: user data, or a damaged store (discarded only with
    --force, and only when it is recognisably ours). Discarding and creating check again under
    the lock."""
    found = identify(path)
    if found.kind in (Kind.ABSENT, Kind.RUN_STORE):
        return
    if not (force and found.kind is Kind.DAMAGED_RUN_STORE):
        raise refusal(path, found)


def open_or_train(cfg: RunConfig, run_dir: str | Path, force: bool = False,
                  download: bool = False, store_url: str | None = None,
                  model_factory: ModelFactory = None,
                  data: Optional[ImageData] = None,
                  task: Optional[Task] = None) -> tuple[Recipe, RunStore]:
    """A store holding a finished run of ``cfg``: reused when present, else trained (or resumed).
    ``task``: the user's own model, data, loss and measurements (fastreplay.task.Task) instead
    of the preset's; ``model_factory`` and ``data`` are shorthands for a task with only those
    (see Recipe). A store trained with another model, other data or other task code is refused
    (fastreplay.store.inputs).

    The store lives at ``store_url`` (see store_location; default RUN_DIR/run.zarr). Takes the
    run directory's lock (another fastreplay process on it is refused) and keeps it in
    ``store.lock`` until ``store.close()``.
    """
    path = store_location(run_dir, store_url)
    _refuse_unusable_store(path, force)
    recipe = Recipe(cfg, download=download, data=data, model_factory=model_factory, task=task)
    lock = lock_run_dir(run_dir, store=path)
    store = None
    try:
        if force and discard_store(path):
            log.info("--force: removed the existing run store %s", path)
        if RunStore.exists(path):
            store = _open_locked(path, lock)
            if store.fingerprint != cfg.fingerprint():
                raise StoreError(f"{path} holds a run of a different config (fingerprint "
                                 f"{store.fingerprint} != {cfg.fingerprint()}); use another "
                                 "--run-dir or --force to discard it")
            check_inputs(recipe, store)
        else:
            store = RunStore.create(path, recipe.cfg.to_dict(), cfg.fingerprint(), versions(),
                                    attrs={"step_backend": recipe.runtime.step_backend,
                                           INPUTS_ATTR: inputs_fingerprint(recipe)})
            store.lock = lock
            crash_point("store_created")
        write_text_atomic(Path(run_dir) / "config.toml", config_text(recipe))
        if store.status in ("trained", "cleaned"):
            log.info("reusing the trained run in %s", path)
            return recipe, store
        state, seconds = train_into_store(recipe, store)
    except BaseException as exc:
        if store is None:
            lock.release()
        else:  # the background writer stops before the lock goes (Ctrl-C, a failed write, ...)
            store.__exit__(type(exc), exc, exc.__traceback__)
        raise
    log.info("trained %d steps in %.1fs, test accuracy %.2f%%; run stored in %s",
             recipe.num_steps, seconds, 100 * store.get_attr("test_accuracy", float("nan")), path)
    return recipe, store


def replay_passes(targets: list[int], batch: int) -> list[list[int]]:
    """This rank's reverse passes (``batch`` targets each). Under torchrun ranks take whole
    passes of the one-process split, so the passes, and the scores, are the same for any number
    of ranks (bitwise, also where a measurement's last bits depend on its pass-mates, as with
    the vmapped step on CUDA)."""
    return shard([targets[lo:lo + batch] for lo in range(0, len(targets), batch)])


def _merge_scores(store: RunStore, kind: str, targets: list[int], recipe: Recipe):
    """Scores for ``targets``, computing only those the store does not hold yet."""
    name = score_name(recipe.cfg)
    have: dict[int, np.ndarray] = {}
    if name in store.score_names():
        old, attrs = store.read_scores(name)
        have = {int(t): old[i] for i, t in enumerate(attrs["targets"])}
    missing = [t for t in targets if t not in have]
    seconds = 0.0
    if missing and store.status == "cleaned":
        raise StoreError(f"the checkpoints of {store.path} were cleaned, so targets {missing[:5]} "
                         "cannot be replayed; rerun with --force to retrain")
    extra = {"start_step": recipe.cfg.replay.start_step}
    if missing:
        new: dict[int, np.ndarray] = {}
        for chunk in replay_passes(missing, recipe.cfg.replay.target_batch):
            res = replay(recipe, store, chunk, kind)
            seconds += res.seconds
            peak = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
                    if recipe.device.type == "cuda" else "")
            log.info("replayed targets %s in %.1fs%s", chunk, res.seconds, peak)
            new.update({t: res.scores[i] for i, t in enumerate(chunk)})
            if world_size() == 1:
                # Only the new rows are written; they count once their target ids are
                # committed, so a crash here keeps every earlier chunk and loses at most this one.
                store.append_scores(name, res.scores, chunk, kind, extra)
            crash_point("replay_chunk")
        if world_size() > 1:  # rank 0 collects every rank's rows and commits them
            parts = gather_to_main(new)
            if parts is not None:
                for part in parts:
                    new.update(part)
                rows = sorted(new)
                store.append_scores(name, np.stack([new[t] for t in rows]), rows, kind, extra)
            barrier()
            seconds = max(gather_all(seconds))
        have.update(new)
        if not is_main():
            return None, seconds, len(missing)
        log.info("replayed %d target(s) in %.1fs (%.2fs each)", len(missing), seconds,
                 seconds / len(missing))
    else:
        log.info("all %d target(s) already scored in the store", len(targets))
    return np.stack([have[t] for t in targets]), seconds, len(missing)


def run_magic(cfg: RunConfig, targets: list[int], run_dir: str | Path, force: bool = False,
              download: bool = False, scores_out: Optional[str] = None,
              plots: bool = True, store_url: str | None = None,
              model_factory: ModelFactory = None,
              data: Optional[ImageData] = None,
              task: Optional[Task] = None) -> MagicResult:
    """Train (or reuse) the run in ``run_dir`` and score ``targets`` over its attribution
    window; ``task``, ``model_factory`` and ``data`` as for open_or_train."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    if is_main():  # rank 0 trains (or reuses) the run; the others wait, then open it
        recipe, store = open_or_train(cfg, run_dir, force, download, store_url, model_factory,
                                      data, task)
    barrier()
    if not is_main():
        recipe = Recipe(cfg, download=download, data=data, model_factory=model_factory, task=task)
        store = RunStore.open(store_location(run_dir, store_url))
        if cfg.measure.reduce == "none":  # a group is one pass: rank 0 replays it alone
            _merge_scores(store, cfg.measure.kind, targets, recipe)
        return None
    try:
        result = _magic_outputs(recipe, store, cfg, targets, run_dir, scores_out, plots)
    except BaseException:
        store.lock.release()  # what is stored stays; the next run resumes from it
        raise
    store.close()
    return result


def _magic_outputs(recipe: Recipe, store: RunStore, cfg: RunConfig, targets: list[int], run_dir,
                   scores_out: Optional[str], plots: bool) -> MagicResult:
    final = load_final(recipe, store)
    kind = cfg.measure.kind
    values = measure(recipe, final.theta, final.buffers, targets, kind).cpu().numpy()
    if cfg.measure.reduce == "mean":  # one group: one row of scores for the mean measurement
        name = "all" if len(targets) == recipe.data.num_test else group_name(targets)
        from ..workflows.debug import score_group
        row, seconds = score_group(recipe, store, name, targets, kind)
        scores, values, replayed = row[None], values.mean(keepdims=True), int(seconds > 0)
        plots = False  # per-target figures do not apply; `fastreplay debug` draws a group's
    else:
        scores, seconds, replayed = _merge_scores(store, kind, targets, recipe)
    store.flush()
    result = MagicResult(targets, scores, values, float(store.get_attr("test_accuracy", float("nan"))),
                         store.get_attr("train_seconds"), seconds, replayed, store.nbytes_on_disk(),
                         torch.cuda.max_memory_allocated() if recipe.device.type == "cuda" else None,
                         run_dir=str(run_dir), store=store.path)
    if scores_out:
        result.scores_out = npy_path(scores_out)
        with disk_errors(result.scores_out):
            np.save(result.scores_out, scores)
        log.info("scores (%d targets x %d examples) written to %s", *scores.shape, result.scores_out)
    render = renderer(recipe) if plots else None
    if render is not None:
        from .plots import influence_figure  # matplotlib: imported only when plotting
        data = recipe.data
        train_y = data.train_y.cpu().numpy()
        with disk_errors(f"the plots in {Path(run_dir) / 'plots'}"):
            for k, t in enumerate(targets):
                path = influence_figure(Path(run_dir) / "plots" / f"target_{t:05d}.png", t,
                                        render(data.test_x[t]), data.test_y[t].cpu().numpy(),
                                        scores[k], lambda i: render(data.train_x[i]), train_y,
                                        data.class_names, kind, float(values[k]))
                result.plots.append(str(path))
        log.info("influence plots written to %s", Path(run_dir) / "plots")
    elif plots:
        log.info("no influence plots: the task's data are not images and it has no show()")
    write_text_atomic(Path(run_dir) / "magic_summary.json", json.dumps(summary(result), indent=2))
    return result


def config_text(recipe: Recipe) -> str:
    """The resolved config saved as RUN_DIR/config.toml, saying which keys the task leaves
    unread."""
    return to_toml(recipe.cfg, recipe.unused_keys)


def renderer(recipe: Recipe):
    """example inputs -> an image to plot: images as they are, other data through the task's
    ``show``; None when there is no way to draw them."""
    if recipe.data.images:
        return lambda x: x.cpu().numpy().transpose(1, 2, 0)
    show = recipe.task.show
    return None if show is None else (lambda x: np.asarray(show(x.cpu())))


def summary(res: MagicResult) -> dict:
    return {"targets": res.targets, "test_accuracy": res.accuracy,
            "train_seconds": res.train_seconds, "replay_seconds": res.replay_seconds,
            "replayed_targets": res.replayed,
            "replay_seconds_per_target": res.replay_seconds / max(1, res.replayed),
            "store_bytes": res.store_bytes, "peak_gpu_bytes": res.peak_gpu_bytes,
            "run_dir": res.run_dir, "store": res.store, "plots": res.plots,
            "scores_out": res.scores_out}


def npy_path(path: str | os.PathLike) -> str:
    """The file numpy.save writes for ``path``: it appends .npy unless the name ends with it."""
    path = os.fspath(path)
    return path if path.endswith(".npy") else path + ".npy"


def counterfactual(cfg: RunConfig, weights: np.ndarray, targets: list[int],
                   download: bool = False, recipe: Optional[Recipe] = None,
                   task: Optional[Task] = None) -> np.ndarray:
    """Retrain with per-example ``weights`` and return the measurements of ``targets``."""
    recipe = recipe or Recipe(cfg, download=download, task=task)
    weights = check_weights(weights, recipe.num_train)
    w = torch.from_numpy(weights).to(recipe.device, recipe.dtype)
    log.debug("retraining %d steps with the given per-example weights", recipe.num_steps)
    t0 = time.perf_counter()
    state = train(recipe, w)
    log.debug("retrained in %.2fs", time.perf_counter() - t0)
    return measure(recipe, state.theta, state.buffers, targets, cfg.measure.kind).cpu().numpy()


def open_trained(run_dir: str | Path, download: bool = False, join_torchrun: bool = False,
                 store_url: str | None = None,
                 model_factory: ModelFactory = None,
                 data: Optional[ImageData] = None,
                 task: Optional[Task] = None) -> tuple[Recipe, RunStore]:
    """The recipe and store of a finished run, rebuilt from the config saved in the store
    (at ``store_url``, default RUN_DIR/run.zarr). A run of a user's own task (or module, or
    data) needs the same ``task`` (``model_factory``, ``data``) again: the store's
    fingerprints refuse any other.

    Takes the run directory's lock (kept in ``store.lock`` until ``store.close()``).
    """
    from ..config import config_from_dict
    path = store_location(run_dir, store_url)
    if not RunStore.exists(path):
        RunStore.open(path).close()  # raises the "no run store" StoreError
    # With a remote store the local run directory (lock, plots) may not exist yet.
    lock = lock_run_dir(run_dir, create=is_remote(path), store=path)
    try:
        store = _open_locked(path, lock)
        cfg = config_from_dict(store.config)
        if join_torchrun:  # under torchrun this rank works on cuda:LOCAL_RANK (or the CPU)
            from ..distributed import init_from_env
            cfg = with_values(cfg, {"device": init_from_env(cfg.device)})
        recipe = Recipe(cfg, download=download, data=data, model_factory=model_factory, task=task)
        check_inputs(recipe, store)
        load_final(recipe, store)  # refuses unfinished runs with a clear message
    except BaseException:
        lock.release()
        raise
    return recipe, store


def run_lds_command(run_dir, models: int, keep: float, targets: Optional[str], removal: str,
                    mask_seed: int = 0, plots: bool = True, models_per_batch: int = 0,
                    store_url: str | None = None, task: Optional[Task] = None):
    from ..core.measure import parse_targets
    from ..workflows.lds import run_lds
    from .plots import lds_figure
    # Bad options fail before the lock is taken and the data loaded (run_lds checks them again,
    # keep against the training set size too).
    check_lds_arguments(models, keep, removal, mask_seed, models_per_batch)
    # Under torchrun every rank retrains its share of the models (distributed.py).
    recipe, store = open_trained(run_dir, join_torchrun=True, store_url=store_url, task=task)
    try:
        ids = parse_targets(targets, recipe.data.num_test) if targets else None
        res, predicted, measured = run_lds(recipe, store, models, keep, ids, removal, mask_seed,
                                           models_per_batch)
        if plots and res is not None:  # res is None on ranks other than 0
            with disk_errors(f"the LDS plot in {Path(run_dir) / 'plots'}"):
                path = lds_figure(Path(run_dir) / "plots" / f"lds_{removal}_keep{keep:g}.png",
                                  res, predicted, measured)
            log.info("LDS plot written to %s", path)
    except BaseException:
        store.lock.release()  # measured models stay stored; the next run resumes from them
        raise
    store.close()
    return res


def run_debug_command(run_dir, group: str, top: int, remove: int, seed: int, plots: bool = True,
                      store_url: str | None = None, task: Optional[Task] = None):
    """`fastreplay debug`: run_debug on the stored run, then RUN_DIR/debug/harm_GROUP.csv (rank,
    index, label, score, harm for every training example), .json (the summary) and .png."""
    import csv
    import io

    from ..workflows.debug import harm, run_debug
    recipe, store = open_trained(run_dir, store_url=store_url, task=task)
    try:
        if remove > recipe.num_train // 2:
            raise ConfigError(f"--retrain-without {remove} would remove more than half of the "
                              f"{recipe.num_train} training examples; use at most "
                              f"{recipe.num_train // 2}")
        res = run_debug(recipe, store, group, remove, seed)
        out = Path(run_dir) / "debug"
        with disk_errors(f"the debug outputs in {out}"):
            out.mkdir(parents=True, exist_ok=True)
            harms = harm(res.scores, res.kind)
            labels = recipe.data.train_y.cpu().numpy()
            table = io.StringIO()
            writer = csv.writer(table)
            writer.writerow(["rank", "index", "label", "score", "harm"])
            for rank, i in enumerate(res.ranking, start=1):
                label = labels[i].tolist()
                writer.writerow([rank, i, label, repr(float(res.scores[i])), repr(float(harms[i]))])
            stem = out / f"harm_{res.group}"
            write_text_atomic(stem.with_suffix(".csv"), table.getvalue())
            res.files.append(str(stem.with_suffix(".csv")))
            render = renderer(recipe) if plots else None
            if render is not None:
                from ..data import flipped_examples
                from .plots import debug_figure
                d = recipe.cfg.data
                flipped = (flipped_examples(recipe.num_train, d.label_noise, d.label_noise_seed)
                           if res.detection else None)
                data = recipe.data
                res.files.append(str(debug_figure(
                    stem.with_suffix(".png"), res.group, harms, lambda i: render(data.train_x[i]),
                    labels, data.class_names, flipped, k=min(top, 12))))
            res.files.append(str(stem.with_suffix(".json")))
            write_text_atomic(stem.with_suffix(".json"), json.dumps(res.summary(top), indent=2))
    except BaseException:
        store.lock.release()
        raise
    store.close()
    return res


CLEAN_CHOICES = ("checkpoints", "lds", "scores", "all")


def clean_run(run_dir: str | Path, what: str, store_url: str | None = None) -> None:
    """Free disk space: delete ``what`` of the run in ``run_dir``: its checkpoints (scores, final
    state and LDS results stay usable), its LDS results, its stored scores (the next `magic`
    replays them; training is reused), or all of it (the store and what fastreplay wrote in the
    run directory, see rundir.py).

    Only a fastreplay run store is touched (``all`` also takes one whose root metadata is
    damaged but whose layout shows it is ours); anything else at the store location is refused
    with a one-line StoreError before any deletion.
    """
    if what not in CLEAN_CHOICES:
        raise ConfigError(f"--what {what!r}: use {', '.join(CLEAN_CHOICES)}")
    path = store_location(run_dir, store_url)
    found = identify(path)
    if found.kind is Kind.ABSENT:
        raise ConfigError(f"{run_dir} holds no run store ({path} missing)")
    usable = DISCARDABLE if what == "all" else (Kind.RUN_STORE,)  # all: also a damaged one of ours
    if found.kind not in usable:
        raise refusal(path, found)
    elsewhere = path != str(store_path(run_dir))  # --store: not inside the run directory
    lock = lock_run_dir(run_dir, create=elsewhere, store=path)
    try:
        if what == "all":
            _clean_all(Path(run_dir), path, lock)
            return
        store = RunStore.open(path)
        store.lock = lock
        before = store.nbytes_on_disk()
        if what == "lds":
            store.delete("lds")
            log.info("removed the LDS results from %s", path)
        elif what == "scores":
            store.delete("scores")
            log.info("removed the stored scores from %s%s", path,
                     "; the checkpoints were cleaned, so scoring again needs --force to retrain"
                     if store.status == "cleaned" else "")
        else:
            store.status = "cleaned"
            store.delete_checkpoints()
            log.info("removed checkpoints from %s (%.1f MB -> %.1f MB); new targets need --force "
                     "to retrain", path, before / 1e6, store.nbytes_on_disk() / 1e6)
        store.close()
    finally:
        lock.release()  # idempotent; already released on success


def _clean_all(run_dir: Path, path: str, lock: RunDirLock) -> None:
    """Delete the store at ``path`` and what fastreplay wrote in ``run_dir`` (rundir.py), under
    ``lock``; the run directory itself goes only when nothing else is left in it."""
    if discard_store(path):
        log.info("removed %s", path)
    kept = remove_run_files(run_dir)
    (run_dir / LOCK_NAME).unlink(missing_ok=True)  # last, while still holding it
    lock.release()
    if kept:
        shown = ", ".join(kept[:5]) + (f" and {len(kept) - 5} more" if len(kept) > 5 else "")
        log.info("kept %s: it still holds %s, which fastreplay did not write", run_dir, shown)
        return
    try:
        run_dir.absolute().rmdir()  # only when empty ("." included)
    except OSError as exc:
        log.info("kept %s (%s)", run_dir, exc.strerror or exc)
        return
    log.info("removed %s", run_dir)
