"""The facade the CLI and users call: train-or-reuse a stored run, score targets, retrain.

Layers (kronfluence-style): api (this) -> train / replay / store -> recipe, models, kernels.
"""
from __future__ import annotations

import contextlib
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
from ..core.runtime import run_threads, use_run_threads
from ..core.train import load_final, train, train_into_store
from ..data import ImageData
from ..distributed import barrier, gather_all, gather_to_main, is_main, shard, world_size
from ..exceptions import ConfigError, StoreError
from ..faults import crash_point
from ..progress import log
from ..store import (
    DISCARDABLE,
    STORE_NAME,
    Kind,
    RunStore,
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
from ..store.rundir import RunDir, claim, clean_run_dir
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


def run_dir_path(run_dir) -> Path:
    """A run directory as given (``~`` expanded, as the CLI does for every path); an empty
    value (an unset shell variable) is refused."""
    return Path(os.path.expanduser(require_path_text(run_dir, "--run-dir")))


def _open_locked(path: str, rd: RunDir) -> RunStore:
    """Open the store at ``path`` under the run directory ``rd``'s locks (kept in
    ``store.run_dir`` until ``store.close()``)."""
    store = RunStore.open(path)
    store.run_dir = rd
    if rd.owner:
        store.remove_partial_files()  # left by a killed writer; we hold the lock
    return store


@contextlib.contextmanager
def _working_in(store: RunStore):
    """A command's work on a locked store: on success the store is closed (its writes settled,
    the locks released); on any failure, Ctrl-C included, the locks are released and what is
    stored stays, so rerunning the command resumes from it."""
    try:
        yield store
    except BaseException:
        store.run_dir.release()
        raise
    store.close()


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
                  task: Optional[Task] = None,
                  outputs: tuple[str, ...] = ()) -> tuple[Recipe, RunStore]:
    """A store holding a finished run of ``cfg``: reused when present, else trained (or resumed).
    ``task``: the user's own model, data, loss and measurements (fastreplay.task.Task) instead
    of the preset's; ``model_factory`` and ``data`` are shorthands for a task with only those
    (see Recipe). A store trained with another model, other data or other task code is refused
    (fastreplay.store.inputs).

    The store lives at ``store_url`` (see store_location; default RUN_DIR/run.zarr). The run
    directory must be new, empty or fastreplay's (store/rundir.py); ``outputs`` are the files
    (relative to it) the caller will write after training, refused up front where a file of
    someone else's stands. Takes the run directory's and the store's locks (another fastreplay
    process on either is refused) and keeps them in ``store.run_dir`` until ``store.close()``.
    """
    run_dir = run_dir_path(run_dir)
    path = store_location(run_dir, store_url)
    _refuse_unusable_store(path, force)
    recipe = Recipe(cfg, download=download, data=data, model_factory=model_factory, task=task)
    rd = claim(run_dir, path, new_run=True)
    store = None
    try:
        rd.check_free(("config.toml",))
        rd.check_free(outputs, fix="move it away or pass --no-plots")
        if force and discard_store(path):
            log.info("--force: removed the existing run store %s", path)
        if RunStore.exists(path):
            store = _open_locked(path, rd)
            if store.fingerprint != cfg.fingerprint():
                raise StoreError(f"{path} holds a run of a different config (fingerprint "
                                 f"{store.fingerprint} != {cfg.fingerprint()}); use another "
                                 "--run-dir or --force to discard it")
            check_inputs(recipe, store)
        else:
            store = RunStore.create(path, recipe.cfg.to_dict(), cfg.fingerprint(), versions(),
                                    attrs={"step_backend": recipe.runtime.step_backend,
                                           INPUTS_ATTR: inputs_fingerprint(recipe),
                                           **run_threads(recipe.device)})
            store.run_dir = rd
            crash_point("store_created")
        rd.write("config.toml", config_text(recipe))
        if store.status in ("trained", "cleaned"):
            log.info("reusing the trained run in %s", path)
            return recipe, store
        state, seconds = train_into_store(recipe, store)
    except BaseException as exc:
        if store is None:
            rd.release()
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
    run_dir = run_dir_path(run_dir)
    outputs = [SUMMARY]
    if plots and cfg.measure.reduce == "none":
        outputs += [target_plot(t) for t in targets]
    if is_main():  # rank 0 trains (or reuses) the run; the others wait, then open it
        recipe, store = open_or_train(cfg, run_dir, force, download, store_url, model_factory,
                                      data, task, outputs=tuple(outputs))
    barrier()
    if not is_main():
        recipe = Recipe(cfg, download=download, data=data, model_factory=model_factory, task=task)
        store = RunStore.open(store_location(run_dir, store_url))
        if cfg.measure.reduce == "none":  # a group is one pass: rank 0 replays it alone
            _merge_scores(store, cfg.measure.kind, targets, recipe)
        return None
    with _working_in(store):
        return _magic_outputs(recipe, store, cfg, targets, run_dir, scores_out, plots)


SUMMARY = "magic_summary.json"


def target_plot(target: int) -> str:
    """The influence plot of a target, relative to the run directory."""
    return f"plots/target_{target:05d}.png"


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
    rd = store.run_dir
    if render is not None:
        from .plots import influence_figure  # matplotlib: imported only when plotting
        data = recipe.data
        train_y = data.train_y.cpu().numpy()
        for k, t in enumerate(targets):
            png = influence_figure(t, render(data.test_x[t]), data.test_y[t].cpu().numpy(),
                                   scores[k], lambda i: render(data.train_x[i]), train_y,
                                   data.class_names, kind, float(values[k]))
            path = rd.write(target_plot(t), png, fix="move it away or pass --no-plots")
            result.plots.append(str(path))
        log.info("influence plots written to %s", Path(run_dir) / "plots")
    elif plots:
        log.info("no influence plots: the task's data are not images and it has no show()")
    rd.write(SUMMARY, json.dumps(summary(result), indent=2))
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

    Takes the run directory's and the store's locks (kept in ``store.run_dir`` until
    ``store.close()``).
    """
    from ..config import stored_config
    run_dir = run_dir_path(run_dir)
    path = store_location(run_dir, store_url)
    if not RunStore.exists(path):
        RunStore.open(path).close()  # raises the "no run store" StoreError
    # With a remote store the local run directory (lock, plots) may not exist yet.
    rd = claim(run_dir, path, create=is_remote(path))
    try:
        store = _open_locked(path, rd)
        cfg = stored_config(store)
        if join_torchrun:  # under torchrun this rank works on cuda:LOCAL_RANK (or the CPU)
            from ..distributed import init_from_env
            cfg = with_values(cfg, {"device": init_from_env(cfg.device)})
        recipe = Recipe(cfg, download=download, data=data, model_factory=model_factory, task=task)
        check_inputs(recipe, store)
        load_final(recipe, store)  # refuses unfinished runs with a clear message
        use_run_threads(store, recipe.device)  # retrainings step as the run did
    except BaseException:
        rd.release()
        raise
    return recipe, store


def lds_plot(removal: str, keep: float, window: str = "") -> str:
    """The LDS figure of an experiment, relative to the run directory (``window``: the suffix
    of a window other than the run's own, Recipe.window_suffix)."""
    return f"plots/lds_{removal}_keep{keep:g}{window}.png"


def run_lds_command(run_dir, models: int, keep: float, targets: Optional[str], removal: str,
                    mask_seed: int = 0, plots: bool = True, models_per_batch: int = 0,
                    store_url: str | None = None, task: Optional[Task] = None):
    from ..core.measure import parse_targets
    from ..workflows.lds import run_lds, scored_window
    from .plots import lds_figure
    # Bad options fail before the lock is taken and the data loaded (run_lds checks them again,
    # keep against the training set size too).
    check_lds_arguments(models, keep, removal, mask_seed, models_per_batch)
    # Under torchrun every rank retrains its share of the models (distributed.py).
    recipe, store = open_trained(run_dir, join_torchrun=True, store_url=store_url, task=task)
    # Measured models stay stored on any failure: the next run resumes from them.
    with _working_in(store):
        recipe = scored_window(recipe, store)
        figure = lds_plot(removal, keep, recipe.window_suffix())
        if plots and is_main():
            store.run_dir.check_free((figure,), fix="move it away or pass --no-plots")
        ids = parse_targets(targets, recipe.data.num_test) if targets else None
        res, predicted, measured = run_lds(recipe, store, models, keep, ids, removal, mask_seed,
                                           models_per_batch)
        if plots and res is not None:  # res is None on ranks other than 0
            path = store.run_dir.write(figure, lds_figure(res, predicted, measured),
                                       fix="move it away or pass --no-plots")
            log.info("LDS plot written to %s", path)
    return res


def run_debug_command(run_dir, group: str, top: int, remove: int, seed: int, plots: bool = True,
                      store_url: str | None = None, task: Optional[Task] = None):
    """`fastreplay debug`: run_debug on the stored run, then RUN_DIR/debug/harm_GROUP.csv (rank,
    index, label, score, harm for every training example), .json (the summary) and .png."""
    import csv
    import io

    from ..core.measure import resolve_group
    from ..workflows.debug import harm, run_debug
    recipe, store = open_trained(run_dir, store_url=store_url, task=task)
    with _working_in(store):
        rd = store.run_dir
        if remove > recipe.num_train // 2:
            raise ConfigError(f"--retrain-without {remove} would remove more than half of the "
                              f"{recipe.num_train} training examples; use at most "
                              f"{recipe.num_train // 2}")
        stem = f"debug/harm_{resolve_group(group, recipe)[0]}"
        rd.check_free([f"{stem}.csv", f"{stem}.json"] + ([f"{stem}.png"] if plots else []))
        res = run_debug(recipe, store, group, remove, seed)
        harms = harm(res.scores, res.kind)
        labels = recipe.data.train_y.cpu().numpy()
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(["rank", "index", "label", "score", "harm"])
        for rank, i in enumerate(res.ranking, start=1):
            label = labels[i].tolist()
            writer.writerow([rank, i, label, repr(float(res.scores[i])), repr(float(harms[i]))])
        res.files.append(str(rd.write(f"{stem}.csv", table.getvalue())))
        render = renderer(recipe) if plots else None
        if render is not None:
            from ..data import flipped_examples
            from .plots import debug_figure
            d = recipe.cfg.data
            flipped = (flipped_examples(recipe.num_train, d.label_noise, d.label_noise_seed)
                       if res.detection else None)
            data = recipe.data
            png = debug_figure(res.group, harms, lambda i: render(data.train_x[i]), labels,
                               data.class_names, flipped, k=min(top, 12))
            res.files.append(str(rd.write(f"{stem}.png", png)))
        res.files.append(str(rd.write(f"{stem}.json", json.dumps(res.summary(top), indent=2))))
    return res


def run_compare_command(run_dir, methods: str, keep: float, removal: str,
                        targets: Optional[str] = None, plots: bool = True,
                        store_url: str | None = None, task: Optional[Task] = None):
    """`fastreplay compare`: every method of ``methods`` against the stored LDS retrainings
    (workflows/compare.py), written to RUN_DIR/compare/COMPARE.csv, .json and .png."""
    import csv
    import io

    from ..core.measure import parse_targets
    from ..methods import resolve_methods
    from ..workflows.compare import run_compare
    from ..workflows.lds import scored_window
    from .arguments import check_compare_arguments
    chosen = resolve_methods(methods)
    check_compare_arguments(keep, removal)
    recipe, store = open_trained(run_dir, store_url=store_url, task=task)
    with _working_in(store):
        recipe = scored_window(recipe, store)
        rd = store.run_dir
        stem = f"compare/{removal}_keep{keep:g}{recipe.window_suffix()}"
        rd.check_free([f"{stem}.csv", f"{stem}.json"] + ([f"{stem}.png"] if plots else []),
                      fix="move it away or pass --no-plots")
        ids = parse_targets(targets, recipe.data.num_test) if targets else None
        res, scores = run_compare(recipe, store, chosen, keep, removal, ids)
        table = io.StringIO()
        writer = csv.writer(table)
        writer.writerow(["method", "label", "lds", "ci_low", "ci_high", "lds_bias_corrected",
                         "seconds_per_target", "skipped", "notes"])
        for r in res.rows:
            low, high = r.lds_ci or (None, None)
            writer.writerow([r.method, r.label, r.lds, low, high, r.lds_bias_corrected,
                             r.seconds_per_target, r.skipped or "", r.notes])
        files = [rd.write(f"{stem}.csv", table.getvalue())]
        files.append(rd.write(f"{stem}.json", json.dumps(res.to_json(), indent=2)))
        if plots and any(not r.skipped for r in res.rows):
            from .plots import compare_figure
            files.append(rd.write(f"{stem}.png", compare_figure(res)))
        log.info("compare outputs written: %s", ", ".join(map(str, files)))
    return res


def run_window_command(run_dir, epochs: Optional[str], min_s: float, keep: float, seed: int,
                       targets: Optional[str] = None, plots: bool = True,
                       store_url: str | None = None, task: Optional[Task] = None):
    """`fastreplay window`: the smoothness screen of each window of the stored run
    (workflows/window.py), written to RUN_DIR/window/window.json and .png."""
    from ..core.measure import parse_targets
    from ..workflows.window import default_windows, parse_windows, scan_windows
    recipe, store = open_trained(run_dir, store_url=store_url, task=task)
    with _working_in(store):
        rd = store.run_dir
        run_epochs = recipe.cfg.train.epochs
        windows = parse_windows(epochs, run_epochs) if epochs else default_windows(run_epochs)
        rd.check_free(["window/window.json"] + (["window/window.png"] if plots else []),
                      fix="move it away or pass --no-plots")
        ids = parse_targets(targets, recipe.data.num_test) if targets else None
        rep = scan_windows(recipe, store, windows, keep, seed, ids, min_s)
        files = [rd.write("window/window.json", json.dumps(rep.to_json(), indent=2))]
        if plots:
            from .plots import window_figure
            files.append(rd.write("window/window.png", window_figure(rep)))
        log.info("window outputs written: %s", ", ".join(map(str, files)))
    return rep


CLEAN_CHOICES = ("checkpoints", "lds", "scores", "all")


def clean_run(run_dir: str | Path, what: str, store_url: str | None = None) -> None:
    """Free disk space: delete ``what`` of the run in ``run_dir``: its checkpoints (scores, final
    state and LDS results stay usable), its LDS results, its stored scores (the next `magic`
    replays them; training is reused), or all of it (the store and what fastreplay wrote in the
    run directory, see store/rundir.py).

    Only a fastreplay run store is touched (``all`` also takes one whose root metadata is
    damaged but whose layout shows it is ours); anything else at the store location is refused
    with a one-line StoreError before any deletion.
    """
    if what not in CLEAN_CHOICES:
        raise ConfigError(f"--what {what!r}: use {', '.join(CLEAN_CHOICES)}")
    run_dir = run_dir_path(run_dir)
    path = store_location(run_dir, store_url)
    found = identify(path)
    if found.kind is Kind.ABSENT:
        raise ConfigError(f"{run_dir} holds no run store ({path} missing)")
    usable = DISCARDABLE if what == "all" else (Kind.RUN_STORE,)  # all: also a damaged one of ours
    if found.kind not in usable:
        raise refusal(path, found)
    elsewhere = path != str(store_path(run_dir))  # --store: not inside the run directory
    rd = claim(run_dir, path, create=elsewhere)
    try:
        if what == "all":
            if discard_store(path):
                log.info("removed %s", path)
            clean_run_dir(rd)
            return
        store = RunStore.open(path)
        store.run_dir = rd
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
        rd.release()  # idempotent; already released on success
