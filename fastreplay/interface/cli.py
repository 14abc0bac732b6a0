"""The `fastreplay` command line (Typer). Each command is a thin shell over fastreplay.interface.api."""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import signal
import sys
from pathlib import Path
from typing import Annotated, Callable, List, Optional

import numpy as np
import typer
from rich.markup import escape

from ..config import PRESETS, load_config, to_toml, with_values
from ..exceptions import ConfigError, FastReplayError, OutputError, TaskExited
from ..progress import LEVELS, log, log_file_failure, setup_logging
from ..store.paths import require_path_text, resolve_store_url
from .arguments import DEFAULT_MIN_S

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Exact data attribution: MAGIC scores by replaying training backwards.")


def _path(name: str):
    """Typer parser of the path option ``name``: refuses an empty or blank value (an unset shell
    variable) while it is still text (Typer would make "" the current directory, Path(".")), and
    expands a leading ``~`` as a shell would have, had the value not been quoted: the command
    then works in the directory its log names, not in a new one literally called ``~``."""
    return lambda value: Path(os.path.expanduser(require_path_text(value, name)))


def _store_url(value: str) -> str:
    """Typer parser of --store: not empty, and a local path or an accepted URL scheme, checked
    before the command does any work (paths.resolve_store_url)."""
    resolve_store_url(require_path_text(value, "--store"))
    return value


Preset = Annotated[str, typer.Option(help=f"Base recipe: {', '.join(PRESETS)}.")]
# Help texts are rich markup: escape() keeps "[data]" from being read as a style tag and vanishing.
ConfigFile = Annotated[Optional[Path], typer.Option("--config", parser=_path("--config"), help=escape(
    "TOML file; tables [data], [model], [train], [measure], [replay], top-level seed and device."))]
Sets = Annotated[Optional[List[str]], typer.Option("--set", help="Dotted override, repeatable: --set train.lr=0.4")]
LogLevel = Annotated[str, typer.Option(help=f"{', '.join(LEVELS[:-1])} or {LEVELS[-1]}.")]
LogFile = Annotated[Optional[Path], typer.Option(parser=_path("--log-file"), help="Also write the log to this file.")]
Download = Annotated[bool, typer.Option(help="Download CIFAR-10 if it is missing.")]
Json = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
TaskSpec = Annotated[Optional[str], typer.Option("--task", help=escape(
    "Your own model, data, loss and measurements: FILE.py:FUNCTION, a zero-argument function "
    "returning a fastreplay.Task (README, 'Your own task'); the --preset/--config/--set options "
    "still set training, replay and measurement."))]
Store = Annotated[Optional[str], typer.Option(
    "--store", parser=_store_url, help="Where the run's Zarr group lives: a path, file:///ABS/PATH "
    "or an object-store URL (s3://, s3a://, gs://, gcs://, az://, abfs://, abfss://) such as "
    "s3://bucket/run.zarr (needs s3fs; endpoint and credentials from AWS_ENDPOINT_URL, "
    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY or AWS_PROFILE). Default RUN_DIR/run.zarr; the run "
    "directory stays local (lock, config.toml, plots, summaries).")]
RUN_DIR_PATH = _path("--run-dir")


def _config(preset: str, config: Optional[Path], sets: Optional[List[str]]):
    return load_config(preset, config, sets or [])


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a batch scheduler's time limit, torchrun stopping a job): handled as
    Ctrl-C is, so what was stored is kept and the command says how to resume, with exit 143."""


def _on_sigterm(signum, frame) -> None:
    raise Terminated()


class Interrupted(Exception):
    """Ctrl-C or SIGTERM inside a command; the message says what is kept and how to go on."""

    def __init__(self, message: str, code: int = 130):
        super().__init__(message)
        self.code = code


def _interruptible(command: str) -> Callable:
    """Turn Ctrl-C (SIGTERM) inside ``command`` into Interrupted, which main() reports with exit
    code 130 (143), and a sys.exit from the task's code into a one-line error.

    It has to be caught here, inside the command: Typer catches a KeyboardInterrupt that reaches
    it and turns it into an exit code that, under standalone_mode=False, it *returns* instead of
    exiting with, so the process used to end silently with code 0.
    """
    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def run(**kwargs):
            try:
                return fn(**kwargs)
            except KeyboardInterrupt as exc:
                term = isinstance(exc, Terminated)
                raise Interrupted(_interrupted_message(command, kwargs, term),
                                  143 if term else 130) from None
            except SystemExit as exc:  # fastreplay itself never calls sys.exit inside a command
                raise TaskExited(_exited_message(command, kwargs, exc.code)) from None
        return run
    return decorate


def _stores(command: str, args: dict) -> Optional[str]:
    """Where ``command`` keeps what it stored (None: it stores nothing): magic, lds, debug and
    train --run-dir resume from their store."""
    if command in ("magic", "lds", "debug") or (command == "train"
                                                 and args.get("run_dir") is not None):
        return str(args.get("store") or args["run_dir"])
    return None


def _interrupted_message(command: str, args: dict, terminated: bool = False) -> str:
    what = "terminated (SIGTERM)" if terminated else "interrupted"
    where = _stores(command, args)
    if where is not None:
        return f"{what}; rerun the same command to resume (what is stored in {where} is kept)"
    return f"{what}; `fastreplay {command}` stores nothing: rerun it to start again"


def _exited_message(command: str, args: dict, code) -> str:
    where = _stores(command, args)
    kept = f" (what is stored in {where} is kept)" if where is not None else ""
    return (f"the task's code called sys.exit({code!r}) during `fastreplay {command}`, which "
            f"stops here{kept}; remove the sys.exit call from the task (raise an exception to "
            "report a problem)")


def _strict_json(obj):
    """NaN and infinities (undefined correlations, say) as null: strict JSON parsers reject them."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict_json(v) for v in obj]
    if hasattr(obj, "tolist"):
        return _strict_json(obj.tolist())
    return obj


def _emit(text: str) -> None:
    """Write a line of the command's output to stdout and flush it, or raise OutputError."""
    out = sys.stdout
    if out is None:  # the shell closed it (`>&-`): print() and click would drop the text
        raise OutputError("stdout is closed, so the command's output cannot be written; run it "
                          "with stdout open (or redirected to a file)")
    try:
        out.write(text + "\n")
        out.flush()
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        with contextlib.suppress(OSError, ValueError):  # no second failure at interpreter exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())
        raise OutputError(f"cannot write the command's output to stdout ({reason}); redirect it "
                          "to a file on a disk with free space, or read the whole pipe") from None


def _echo_json(obj) -> None:
    _emit(json.dumps(_strict_json(obj), default=str, allow_nan=False))


@app.command()
@_interruptible("magic")
def magic(
    targets: Annotated[str, typer.Option(help="Test examples to attribute: 0,5,7 or 0:50.")],
    run_dir: Annotated[Path, typer.Option(parser=RUN_DIR_PATH, help="Run directory (holds run.zarr, plots/, config.toml).")],
    preset: Preset = "quick", config: ConfigFile = None, set_: Sets = None,
    scores_out: Annotated[Optional[Path], typer.Option(parser=_path("--scores-out"), help="Also save the scores (targets x N) to this .npy file (.npy is appended unless the name ends with it).")] = None,
    force: Annotated[bool, typer.Option(help="Discard an existing run store in --run-dir (or at --store).")] = False,
    plots: Annotated[bool, typer.Option(help="Save a PNG per target.")] = True,
    store: Store = None, download: Download = False, json_: Json = False,
    log_level: LogLevel = "INFO", log_file: LogFile = None, task: TaskSpec = None,
):
    """Train (or reuse the stored run), replay it backwards, store and plot exact scores."""
    setup_logging(log_level, log_file)
    from ..core.measure import parse_targets
    from ..distributed import init_from_env
    from ..task import num_test_examples
    from .api import run_magic, summary

    cfg = _config(preset, config, set_)
    if scores_out is not None and scores_out.is_dir():
        raise ConfigError(f"--scores-out {scores_out} is a directory; name a file in it, e.g. "
                          f"{scores_out / 'scores.npy'}")
    user_task = _load_task(task)
    cfg = with_values(cfg, {"device": init_from_env(cfg.device)})  # under torchrun: this rank's
    num_test = num_test_examples(user_task) if user_task else _num_test(cfg, download)
    ids = parse_targets(targets, num_test)
    res = run_magic(cfg, ids, run_dir, force=force, download=download,
                    scores_out=str(scores_out) if scores_out else None, plots=plots,
                    store_url=store, task=user_task)
    if res is None:  # a torchrun rank other than 0: rank 0 reports
        return
    out = summary(res)
    if json_:
        _echo_json(out)
    else:
        log.info("test accuracy %.2f%% | replay %.2fs per target | store %.1f MB | outputs in %s",
                 100 * res.accuracy, out["replay_seconds_per_target"], res.store_bytes / 1e6, run_dir)


def _load_task(spec: Optional[str]):
    """--task FILE.py:FUNCTION -> the user's Task (None without --task)."""
    if spec is None:
        return None
    from ..task import load_task
    return load_task(spec)


def _num_test(cfg, download: bool) -> int:
    from ..data import load_data
    if cfg.data.num_test:
        return cfg.data.num_test
    return len(load_data(cfg, download).test_y)


@app.command("train")
@_interruptible("train")
def train_cmd(
    weights: Annotated[Optional[Path], typer.Option(help="Per-example weights, float .npy of length N (default: all ones).")] = None,
    measure: Annotated[Optional[str], typer.Option(help="Test examples to measure after training: 0,5 or 0:10 (default 0).")] = None,
    run_dir: Annotated[Optional[Path], typer.Option(parser=RUN_DIR_PATH, help="Train the run and store it here (no replay), for `smoothness`, or `magic` later; without it nothing is stored.")] = None,
    force: Annotated[bool, typer.Option(help="With --run-dir: discard an existing run store there (or at --store).")] = False,
    preset: Preset = "quick", config: ConfigFile = None, set_: Sets = None,
    store: Store = None, download: Download = False, json_: Json = False,
    log_level: LogLevel = "WARNING", log_file: LogFile = None, task: TaskSpec = None,
):
    """Retrain with per-example data weights and print the measurements (the counterfactual oracle); with --run-dir, train and store the run instead."""
    setup_logging(log_level, log_file)
    from ..core.measure import parse_targets
    from ..core.recipe import Recipe
    from .api import counterfactual

    cfg = _config(preset, config, set_)
    if run_dir is None:
        if store is not None or force:
            raise ConfigError("--store and --force apply to a stored run; add --run-dir DIR")
    else:
        if weights is not None or measure is not None:
            option = "--weights" if weights is not None else "--measure"
            raise ConfigError(f"{option} belongs to a counterfactual retraining, which stores "
                              f"nothing; drop --run-dir (or {option} to train and store the run)")
        _train_into_run_dir(cfg, run_dir, force, download, store, json_, _load_task(task))
        return
    recipe = Recipe(cfg, download=download, task=_load_task(task))
    ids = parse_targets(measure or "0", recipe.data.num_test)
    if weights is None:
        w = np.ones(recipe.num_train)
    else:
        w = _load_weights(weights)
    values = counterfactual(cfg, w, ids, recipe=recipe)
    out = {"measure": {"index": ids, "value": [float(v) for v in values]}, "kind": cfg.measure.kind}
    if json_:
        _echo_json(out)
    else:
        for i, v in zip(ids, values):
            _emit(f"test {i}: {cfg.measure.kind} = {v:.6g}")


def _train_into_run_dir(cfg, run_dir: Path, force: bool, download: bool, store: Optional[str],
                        json_: bool, task=None) -> None:
    """`train --run-dir`: train (or reuse) and store the run as `magic` would, replay nothing."""
    from .api import open_or_train

    recipe, run_store = open_or_train(cfg, run_dir, force, download, store, task=task)
    out = {"run_dir": str(run_dir), "store": run_store.path, "steps": recipe.num_steps,
           "test_accuracy": run_store.get_attr("test_accuracy"),
           "train_seconds": run_store.get_attr("train_seconds")}
    run_store.close()
    if json_:
        _echo_json(out)
    else:
        _emit(f"trained {out['steps']} steps in {out['train_seconds']:.1f}s, test accuracy "
                   f"{100 * out['test_accuracy']:.2f}%; run stored in {out['store']}")


def _load_weights(path: Path) -> np.ndarray:
    """A .npy file of weights, any failure to read it as one a ConfigError (an empty file raises
    EOFError, which Typer would otherwise swallow as an abort)."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"cannot read weights {path}: {reason}; save them with numpy.save") from None


@app.command()
@_interruptible("lds")
def lds(
    run_dir: Annotated[Path, typer.Option(parser=RUN_DIR_PATH, help="Run directory of a `fastreplay magic` run.")],
    models: Annotated[int, typer.Option(help="Number of subset retrainings M.")] = 100,
    keep: Annotated[float, typer.Option(help="Fraction of the training set each subset keeps.")] = 0.99,
    targets: Annotated[Optional[str], typer.Option(help="Scored targets to evaluate (default: all scored).")] = None,
    removal: Annotated[str, typer.Option(help="weight (w=0 in the same batch slots) or drop (out of the batch).")] = "weight",
    mask_seed: Annotated[int, typer.Option(help="Seed of the subset draws.")] = 0,
    models_per_batch: Annotated[int, typer.Option(help="Models trained at once (0 = measure and pick).")] = 0,
    plots: Annotated[bool, typer.Option(help="Save the scatter and histogram PNGs.")] = True,
    store: Store = None, json_: Json = False, log_level: LogLevel = "INFO", log_file: LogFile = None,
    task: TaskSpec = None,
):
    """Validate the stored scores by retraining on random subsets (linear datamodeling score)."""
    setup_logging(log_level, log_file)
    from .api import run_lds_command
    from .arguments import check_lds_arguments

    check_lds_arguments(models, keep, removal, mask_seed, models_per_batch)  # before the import
    res = run_lds_command(run_dir, models, keep, targets, removal, mask_seed, plots,
                          models_per_batch, store_url=store, task=_load_task(task))
    if res is None:  # a torchrun rank other than 0: rank 0 reports
        return
    if json_:
        _echo_json(res.to_json())
    else:
        log.info("LDS %.3f (bias-corrected %.3f, 95%% CI %.3f..%.3f, %s) over %d targets, "
                 "%d models, keep %g, %s removal", res.lds_mean, res.lds_bias_corrected,
                 res.lds_ci[0], res.lds_ci[1], res.ci_method, len(res.per_target["index"]),
                 res.models, res.keep, res.removal)


@app.command()
@_interruptible("debug")
def debug(
    run_dir: Annotated[Path, typer.Option(parser=RUN_DIR_PATH, help="Run directory of a trained run (`fastreplay magic` or `train --run-dir`).")],
    group: Annotated[str, typer.Option(help="Test examples whose mean loss to explain: all, class:C, a file of test ids, or a targets spec such as 0:100.")] = "all",
    top: Annotated[int, typer.Option(help="How many of the most harmful and most helpful examples to list and draw.")] = 16,
    retrain_without: Annotated[int, typer.Option(help="Retrain without the K most harmful examples and, as a control, without K random ones, and report the change (0: no retraining).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the random control set.")] = 0,
    plots: Annotated[bool, typer.Option(help="Draw the most harmful and helpful examples.")] = True,
    store: Store = None, json_: Json = False, log_level: LogLevel = "INFO", log_file: LogFile = None,
    task: TaskSpec = None,
):
    """Rank every training example by how much it harms a group of test examples (one replay of their mean measurement); write the ranking, a picture and, with --retrain-without, the proof by retraining."""
    setup_logging(log_level, log_file)
    from .api import run_debug_command
    from .arguments import check_debug_arguments

    check_debug_arguments(top, retrain_without, seed)
    res = run_debug_command(run_dir, group, top, retrain_without, seed, plots,
                            store_url=store, task=_load_task(task))
    out = res.summary(top)
    if json_:
        _echo_json(out)
        return
    log.info("group %s (%d test examples): mean %s %.4f; most harmful training examples %s",
             res.group, res.members, res.kind, res.value, res.ranking[:min(top, 10)])
    if res.detection:
        det = res.detection
        others = ", ".join(f"{det[n]['auroc']:.3f} by {n.replace('_', ' ')}" for n in det
                           if isinstance(det[n], dict) and n != "scores")
        log.info("planted label noise (%d flipped): AUROC %.3f by the scores; %s",
                 det["flipped"], det["scores"]["auroc"], others)
    if res.held_out_value is not None:
        log.info("held out (the %d test examples outside the group): mean %s %.4f, accuracy "
                 "%.2f%%", res.held_out_members, res.kind,
                 res.held_out_value, 100 * res.held_out_accuracy)
    for r in res.retrained:
        held = ("" if r.held_out_value is None else
                f"; held out: mean {res.kind} {r.held_out_value:.4f} "
                f"({r.held_out_value - res.held_out_value:+.4f}), accuracy "
                f"{100 * r.held_out_accuracy:.2f}%")
        log.info("without %s: mean %s %.4f (%+.4f; predicted %+.4f), test accuracy %.2f%%%s",
                 r.removed, res.kind, r.value, r.value - res.value, r.predicted_change,
                 100 * r.accuracy, held)
    if res.retrained and res.held_out_value is None:
        log.info("the group is the whole test set, so these retrainings are judged in-sample (the "
                 "removal was chosen on the same examples); --group 0:%d judges them on the other "
                 "half too", max(1, res.members // 2))
    log.info("written: %s", ", ".join(res.files))


DEFAULT_METHODS = "magic,gradsim,trak,ekfac,kfac,if,tracin"


@app.command()
@_interruptible("compare")
def compare(
    run_dir: Annotated[Path, typer.Option(parser=RUN_DIR_PATH, help="Run directory with stored scores and a finished `fastreplay lds`.")],
    methods: Annotated[str, typer.Option(help=escape("Comma-separated: magic, gradsim, trak, ekfac, kfac, if, if-lissa, tracin (the peers need `pip install 'fastreplay[peers]'`)."))] = DEFAULT_METHODS,
    keep: Annotated[float, typer.Option(help="The stored LDS experiment to judge by: its --keep.")] = 0.99,
    removal: Annotated[str, typer.Option(help="... and its --removal (weight or drop).")] = "weight",
    targets: Annotated[Optional[str], typer.Option(help="Targets among those the LDS experiment measured (default: all of them).")] = None,
    plots: Annotated[bool, typer.Option(help="Save the LDS-and-cost PNG.")] = True,
    store: Store = None, json_: Json = False, log_level: LogLevel = "INFO", log_file: LogFile = None,
    task: TaskSpec = None,
):
    """Score the stored LDS targets with other attribution methods (TRAK, EK-FAC, K-FAC, influence functions, TracIn, gradient similarity) and hold every one, MAGIC included, against the same retrainings: a table, CSV/JSON and a plot."""
    setup_logging(log_level, log_file)
    from .api import run_compare_command
    from .arguments import check_compare_arguments

    check_compare_arguments(keep, removal)  # before the lock is taken and the data loaded
    res = run_compare_command(run_dir, methods, keep, removal, targets, plots, store_url=store,
                              task=_load_task(task))
    if json_:
        _echo_json(res.to_json())
    else:
        _emit(res.table())


@app.command()
@_interruptible("window")
def window(
    run_dir: Annotated[Path, typer.Option(parser=RUN_DIR_PATH, help="Run directory of a trained run (`fastreplay train --run-dir` or `magic`).")],
    epochs: Annotated[Optional[str], typer.Option(help="Windows to screen, in epochs: \"1,2,4\" (default: the last 1, 2, 4, ... epochs and the whole run).")] = None,
    min_s: Annotated[float, typer.Option(help="The metasmoothness S a window must reach to be recommended.")] = DEFAULT_MIN_S,
    keep: Annotated[float, typer.Option(help="Fraction kept by the probe direction (as in LDS).")] = 0.99,
    seed: Annotated[int, typer.Option(help="Seed of the removed set.")] = 0,
    targets: Annotated[Optional[str], typer.Option(help="Test examples whose curvature ratio is measured (default: as `smoothness`).")] = None,
    plots: Annotated[bool, typer.Option(help="Save the S-per-window PNG.")] = True,
    store: Store = None, json_: Json = False, log_level: LogLevel = "INFO", log_file: LogFile = None,
    task: TaskSpec = None,
):
    """How far back the scores hold: the replay-free smoothness screen (metasmoothness S, curvature ratio) of each window of the stored run, four trainings of each, and the longest window with S >= --min-s, recommended."""
    setup_logging(log_level, log_file)
    from .api import run_window_command
    from .arguments import check_window_arguments

    check_window_arguments(keep, seed, min_s)  # before the lock is taken and the data loaded
    rep = run_window_command(run_dir, epochs, min_s, keep, seed, targets, plots,
                             store_url=store, task=_load_task(task))
    if json_:
        _echo_json(rep.to_json())
    else:
        _emit(rep.table())


MAX_BENCH_TARGETS = 100
"""bench --targets: K measurements take K parameter-sized vectors (26 MB each for resnet9)."""


def _bench_counts(spec: str) -> tuple[int, ...]:
    """bench --targets "1,10": the measurement counts K, each in 1..MAX_BENCH_TARGETS."""
    try:
        ks = tuple(int(k) for k in spec.split(","))
    except ValueError:
        ks = ()
    if not ks or not all(1 <= k <= MAX_BENCH_TARGETS for k in ks):
        raise ConfigError(f"--targets {spec!r}: use measurement counts in 1..{MAX_BENCH_TARGETS}, "
                          "e.g. 1,10")
    return ks


def _check_bench_device(device: str) -> None:
    """bench --device: a name torch knows, of a device this machine has."""
    import torch

    from ..config import DEVICE_NAME
    from ..core.runtime import resolve_device

    if device == "auto" or not DEVICE_NAME.fullmatch(device):
        raise ConfigError(f"--device {device!r}: use cpu, cuda or cuda:N")
    if device != "cpu" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: no CUDA device is visible; use --device cpu")
    resolve_device(device)


@app.command()
@_interruptible("bench")
def bench(
    what: Annotated[str, typer.Argument(help="kernels (fused adjoint vs foreach) or replay (step and run costs of a recipe).")] = "kernels",
    device: Annotated[str, typer.Option(help="cuda, cuda:N or cpu.")] = "cuda",
    targets: Annotated[str, typer.Option(help=f"Measurement counts K to time, e.g. 1,10 (each 1..{MAX_BENCH_TARGETS}).")] = "1,10",
    preset: Preset = "full", config: ConfigFile = None, set_: Sets = None,
    json_: Json = False, log_level: LogLevel = "WARNING", log_file: LogFile = None,
):
    """Benchmarks against the pure-PyTorch reference path (see benchmarks/RESULTS.md)."""
    setup_logging(log_level, log_file)
    if what not in ("kernels", "replay"):
        raise ConfigError(f"unknown benchmark {what!r}; available: kernels, replay")
    ks = _bench_counts(targets)
    _check_bench_device(device)
    from ..workflows.bench import bench_kernels, bench_replay

    if what == "kernels":
        out = bench_kernels(device, targets=ks)
        rows = out["rows"] + [{"optimizer": "adam", **r} for r in out["adam_rows"]]
    else:
        out = bench_replay(_config(preset, config, (set_ or []) + [f"device={device}"]), targets=max(ks))
        rows = [out]
    if json_:
        _echo_json(out)
        return
    for r in rows:
        _emit(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


@app.command()
@_interruptible("smoothness")
def smoothness(
    run_dir: Annotated[Path, typer.Option(parser=RUN_DIR_PATH, help="Run directory of a `fastreplay magic` run.")],
    keep: Annotated[float, typer.Option(help="Fraction kept by the probe direction (as in LDS).")] = 0.99,
    seed: Annotated[int, typer.Option(help="Seed of the removed set.")] = 0,
    targets: Annotated[Optional[str], typer.Option(help="Test examples to measure: scored ones when the store holds scores (default: all scored), else any (default 0:8).")] = None,
    store: Store = None, json_: Json = False, log_level: LogLevel = "INFO", log_file: LogFile = None,
    task: TaskSpec = None,
):
    """Cheap predictability check of a recipe in four trainings of the attribution window: determinism (one), metasmoothness and linearity along one LDS-like direction (three); needs scores only for the linearity score."""
    setup_logging(log_level, log_file)
    from ..core.measure import parse_targets
    from ..workflows.smoothness import PASS_THRESHOLD, check_smoothness
    from .api import open_trained
    from .arguments import check_smoothness_arguments

    check_smoothness_arguments(keep, seed)  # before the lock is taken and the data loaded
    recipe, run_store = open_trained(run_dir, store_url=store, task=_load_task(task))
    ids = parse_targets(targets, recipe.data.num_test) if targets else None
    rep = check_smoothness(recipe, run_store, keep, seed, ids)
    if json_:
        _echo_json(rep.to_json())
    elif rep.scored:
        log.info("deterministic: %s | metasmoothness %.2f | smoothness %.2f (pass >= %.1f: %s) | "
                 "Spearman(predicted, actual) %.2f | curvature ratio %.2f", rep.deterministic,
                 rep.metasmoothness, rep.score, PASS_THRESHOLD, "PASS" if rep.passed else "FAIL",
                 rep.spearman_predicted_vs_actual, rep.median_curvature_ratio)
    else:
        log.info("deterministic: %s | metasmoothness %.2f | curvature ratio %.2f (no scores "
                 "stored: run `fastreplay magic` for the linearity score)", rep.deterministic,
                 rep.metasmoothness, rep.median_curvature_ratio)


@app.command("show-config")
@_interruptible("show-config")
def show_config(preset: Preset = "quick", config: ConfigFile = None, set_: Sets = None,
                json_: Json = False):
    """Print the resolved configuration (preset < --config < --set) and exit."""
    cfg = _config(preset, config, set_)
    if json_:
        _echo_json(cfg.to_dict())
    else:
        _emit(to_toml(cfg).rstrip("\n"))


@app.command()
def clean(run_dir: Annotated[Path, typer.Argument(parser=_path("RUN_DIR"), help="Run directory to clean.")],
          what: Annotated[str, typer.Option(help="checkpoints (keep scores and final state), lds, scores or all.")] = "checkpoints",
          store: Store = None, log_level: LogLevel = "INFO"):
    """Free disk space: drop the checkpoints (scores stay usable), the LDS results, the stored
    scores, or all the run wrote (its store, config.toml, magic_summary.json, its plots; the
    run directory goes only when nothing else is in it)."""
    setup_logging(log_level)
    from .api import clean_run

    clean_run(run_dir, what, store)


@app.command()
@_interruptible("info")
def info(json_: Json = False):
    """Versions, the device, and whether the compiled kernels are loaded."""
    import torch

    from .. import __version__
    from ..core import kernels

    out = {"fastreplay": __version__, "python": platform.python_version(), "torch": torch.__version__,
           "cuda_available": torch.cuda.is_available(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "extension_loaded": kernels.extension_loaded(),
           "extension_error": kernels.extension_error(),
           "cuda_kernels": kernels.cuda_kernels_built()}
    try:
        import zarr
        out["zarr"] = zarr.__version__
    except ImportError:
        out["zarr"] = None
    if json_:
        _echo_json(out)
    else:
        for k, v in out.items():
            _emit(f"{k:18s} {v}")


def main() -> None:
    """Run the command the arguments name and exit with its code: 0 done, 2 bad input (one
    `error: ...` line on stderr, also when the log file or the output could not be written),
    130 interrupted (Ctrl-C), 143 terminated (SIGTERM)."""
    previous = _handle_sigterm()
    try:
        code = _run_command()
        _settle_store_writes()
    finally:
        if previous is not None:  # main() run in-process (tests): leave the handler as it was
            signal.signal(signal.SIGTERM, previous)
    failed = log_file_failure()
    if failed and code in (0, None):  # the log the user asked for is incomplete: say so
        code = _error(failed)
    sys.exit(code)


def _handle_sigterm():
    """Install the SIGTERM handler (Terminated); returns the previous one (None where signals
    cannot be handled: a thread other than the main one)."""
    try:
        return signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:
        return None


def _stopped(exc: BaseException) -> int:
    """A Ctrl-C or SIGTERM outside a command (start-up, argument parsing): one line, 130/143."""
    if isinstance(exc, Terminated):
        typer.echo("terminated (SIGTERM)", err=True)
        return 143
    typer.echo("interrupted", err=True)
    return 130


PRINTING = ("train", "bench", "show-config", "info", "compare")
"""Commands whose results go to stdout even without --json (the others log to stderr)."""


def _run_command() -> int:
    args = sys.argv[1:]
    if sys.stdout is None and ("--json" in args or any(a in PRINTING for a in args[:1])):
        return _error("stdout is closed, so the command's output cannot be written; run it with "
                      "stdout open (or redirected to a file)")  # before any work, not after it
    try:
        returned = app(standalone_mode=False)
    except FastReplayError as exc:
        return _error(str(exc))
    except Interrupted as exc:
        typer.echo(exc, err=True)
        return exc.code
    except KeyboardInterrupt as exc:  # before a command started (Typer catches it inside one)
        return _stopped(exc)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Exception as exc:
        if _is_click_error(exc):
            return _click_error(exc)
        if type(exc).__name__ == "Abort" and isinstance(exc.__context__, KeyboardInterrupt):
            return _stopped(exc.__context__)  # click without Typer's own handling: Ctrl-C
        raise  # an EOFError that Typer wrapped as Abort, or a bug: its traceback says where
    # Under standalone_mode=False Typer returns exit codes instead of exiting with them:
    # typer.Exit(n), and 130 for a Ctrl-C it caught itself (outside our commands, e.g. clean).
    if returned == 130:
        typer.echo("interrupted", err=True)
    return returned if isinstance(returned, int) else 0


def _error(message: str) -> int:
    """The one line of bad input, `error: <what is wrong>; <how to fix it>`, and exit code 2."""
    typer.echo("error: " + " ".join(message.split("\n")), err=True)
    return 2


def _is_click_error(exc: Exception) -> bool:
    """Click's own errors (Typer bundles its own click, so test by shape, not class)."""
    return hasattr(exc, "show") and hasattr(exc, "exit_code")


def _click_error(exc) -> int:
    """Usage errors (unknown option, bad value, missing option) as our one error line; the
    help that `fastreplay` alone prints stays as it is."""
    if type(exc).__name__ == "NoArgsIsHelpError" or exc.exit_code != 2:
        exc.show()
        return exc.exit_code
    ctx = getattr(exc, "ctx", None)
    hint = f"see `{ctx.command_path} --help`" if ctx is not None else "see --help"
    return _error(f"{exc.format_message().rstrip('.')}; {hint}")


def _settle_store_writes() -> None:
    """Writes zarr still has in flight (a command that failed or was interrupted mid-write) are
    settled before exiting, so they do not end as asyncio noise on stderr (store/pending.py)."""
    if "zarr.core.sync" in sys.modules:
        from ..store.pending import settle_pending_writes
        settle_pending_writes()


if __name__ == "__main__":
    main()
