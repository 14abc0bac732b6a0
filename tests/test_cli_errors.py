"""No command a user types ends in a traceback or a wrong exit code.

Bad input: exit 2 and exactly one line `error: <what is wrong>; <how to fix it>` on stderr.
Ctrl-C: exit 130 and one line saying what is kept. Checked on real `python -m fastreplay.interface.cli`
processes (what users see: stderr after interpreter shutdown, real signals), plus an in-process
sweep of hostile values over every option of every command, to catch the next such bug.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import typer
from test_robustness import CONFIG, REPO, _main, error_line, fastreplay, fastreplay_all

from fastreplay.config import RunConfig, load_config
from fastreplay.exceptions import ConfigError
from fastreplay.interface.cli import app
from fastreplay.store import RunStore

HUGE = "99999999999999999999999"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Hostile inputs on disk: binary files, bad weights, an empty directory."""
    root = tmp_path_factory.mktemp("files")
    out = {"root": root, "empty_dir": root / "empty", "missing": root / "missing" / "x"}
    out["empty_dir"].mkdir()
    out["binary"] = root / "binary.toml"
    out["binary"].write_bytes(bytes(range(256)) * 4)
    out["huge_toml"] = root / "huge.toml"
    out["huge_toml"].write_text(f"[train]\nepochs = {HUGE}\n")
    weights = {"strings": np.array(["a"] * 96), "complex": np.ones(96) + 1j,
               "objects": np.array([1.0] * 96, dtype=object)}
    for name, w in weights.items():
        out[name] = root / f"{name}.npy"
        np.save(out[name], w, allow_pickle=True)
    out["empty_npy"] = root / "empty.npy"
    out["empty_npy"].write_bytes(b"")
    return out


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory) -> Path:
    """A finished run of the small CONFIG with targets 0 and 1 scored."""
    run_dir = tmp_path_factory.mktemp("scored") / "run"
    proc = fastreplay("magic", *CONFIG, "--targets", "0:2", "--no-plots", "--log-level", "ERROR",
                      "--run-dir", run_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


# --- bad input: (argv, a fragment of the one error line) -----------------------------------------

# {name} is replaced by the path of files[name]; show-config runs fail without importing torch.
BAD_INPUT = {
    "config-binary": (["show-config", "--config", "{binary}"],
                      "is not UTF-8 text (byte 0x80 at offset 128); pass a TOML file"),
    "config-directory": (["show-config", "--config", "{empty_dir}"],
                         "is a directory; pass a TOML file"),
    "toml-int-overflow": (["show-config", "--config", "{huge_toml}"],
                          f"train.epochs={HUGE} is out of range; use 1..1000"),
    "set-epochs-huge": (["show-config", "--set", f"train.epochs={HUGE}"],
                        f"train.epochs={HUGE} is out of range; use 1..1000"),
    "set-num-train-huge": (["show-config", "--set", "data.num_train=99999999999"],
                           "data.num_train=99999999999 is out of range; use 0..1000000 (0 = all)"),
    "set-width-huge": (["show-config", "--set", "model.width=1e9"],
                       "model.width=1e+09 is too large; use at most 8"),
    "set-lr-inf": (["show-config", "--set", "train.lr=1e999"],
                   "train.lr=inf is not a finite number; use a finite value"),
    "set-float-overflow": (["show-config", "--set", "train.lr=1" + "0" * 400],
                           "config key 'train.lr' is too large for a number"),
    "set-seed-negative": (["show-config", "--set", "seed=-1"],
                          "seed=-1 is out of range; use 0..4294967295"),
    "set-device": (["show-config", "--set", "device=cuda:x"],
                   "device='cuda:x': use auto, cpu, cuda or cuda:N"),
    "log-level": (["lds", "--run-dir", "{empty_dir}", "--log-level", "BOGUS"],
                  "--log-level 'BOGUS': use DEBUG, INFO, WARNING or ERROR"),
    "log-file": (["show-config", "--preset", "test"], None),  # placeholder, replaced below
    "targets-huge": (["magic", *CONFIG, "--targets", "0:99999999999", "--run-dir", "{root}/t"],
                     "target 64 is out of range: the test set has 64 examples"),
    "weights-strings": (["train", *CONFIG, "--weights", "{strings}"],
                        "weights have dtype <U1 (strings); pass real numbers"),
    "weights-complex": (["train", *CONFIG, "--weights", "{complex}"],
                        "weights have dtype complex128 (complex numbers); pass real numbers"),
    "weights-objects": (["train", *CONFIG, "--weights", "{objects}"],
                        "Object arrays cannot be loaded when allow_pickle=False; save them with"),
    "weights-empty-file": (["train", *CONFIG, "--weights", "{empty_npy}"],
                           "No data left in file; save them with numpy.save"),
    "lds-models-huge": (["lds", "--run-dir", "{empty_dir}", "--models", "1000000000000"],
                        "--models 1000000000000 is out of range; use 3..100000"),
    "lds-mask-seed": (["lds", "--run-dir", "{empty_dir}", "--mask-seed", "-1"],
                      "--mask-seed -1 is out of range; use a seed in 0..4294967295"),
    "lds-keep-nan": (["lds", "--run-dir", "{empty_dir}", "--keep", "nan"],
                     "--keep nan: use a fraction in (0, 1)"),
    "lds-models-per-batch": (["lds", "--run-dir", "{empty_dir}", "--models-per-batch", HUGE],
                             f"--models-per-batch {HUGE} is out of range; use 0..100000"),
    "lds-removal": (["lds", "--run-dir", "{empty_dir}", "--removal", "both"],
                    "--removal 'both': use weight or drop"),
    "lds-no-store": (["lds", "--run-dir", "{empty_dir}"],
                     "; run `fastreplay magic --run-dir DIR ...` first or check --run-dir"),
    "smoothness-seed": (["smoothness", "--run-dir", "{empty_dir}", "--seed", "-1"],
                        "--seed -1 is out of range; use a seed in 0..4294967295"),
    "smoothness-keep-nan": (["smoothness", "--run-dir", "{empty_dir}", "--keep", "nan"],
                            "--keep nan: use a fraction in (0, 1)"),
    "smoothness-no-store": (["smoothness", "--run-dir", "{empty_dir}"],
                            "; run `fastreplay magic --run-dir DIR ...` first"),
    "bench-targets": (["bench", "replay", "--targets", "abc"],
                      "--targets 'abc': use measurement counts in 1..100"),
    "bench-device": (["bench", "--device", "bogus"], "--device 'bogus': use cpu, cuda or cuda:N"),
    "usage-missing-option": (["magic", "--run-dir", "{root}/u"],
                             "Missing option '--targets'; see `"),
    "usage-unknown-option": (["show-config", "--log-level", "INFO"],
                             "No such option: --log-level; see `"),
}
BAD_INPUT["log-file"] = (["magic", *CONFIG, "--targets", "0", "--run-dir", "{root}/l",
                          "--log-file", "{missing}"],
                         "cannot open it (No such file or directory); create its directory")


def _fill(argv: list[str], files: dict[str, Path]) -> list[str]:
    return [re.sub(r"\{(\w+)\}", lambda m: str(files[m.group(1)]), a) for a in argv]


@pytest.fixture(scope="module")
def bad_input_results(files) -> dict[str, subprocess.CompletedProcess]:
    """Every BAD_INPUT case, four processes at a time."""
    names = list(BAD_INPUT)
    out = {}
    for lo in range(0, len(names), 4):
        chunk = names[lo:lo + 4]
        for name, proc in zip(chunk, fastreplay_all(*(_fill(BAD_INPUT[n][0], files) for n in chunk),
                                                    timeout=120)):
            out[name] = proc
    return out


@pytest.mark.parametrize("name", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(name, bad_input_results):
    line = error_line(bad_input_results[name])
    assert BAD_INPUT[name][1] in line, line


def test_weights_of_objects_are_refused_by_the_api():
    """api.counterfactual refuses what the CLI cannot even load (object arrays) by dtype kind."""
    from fastreplay.core.recipe import Recipe
    from fastreplay.interface.api import counterfactual
    cfg = load_config("test", None, CONFIG[3::2])
    recipe = Recipe(cfg)
    for bad, words in ((np.array([1.0] * 96, dtype=object), "object (Python objects)"),
                       (np.ones(96) * (1 + 1j), "complex128 (complex numbers)"),
                       (np.array(["1"] * 96), "<U1 (strings)")):
        with pytest.raises(ConfigError, match=re.escape(f"weights have dtype {words}")):
            counterfactual(cfg, bad, [0], recipe=recipe)


# --- Ctrl-C: exit 130, one line, and the store resumes ---------------------------------------

# Training (96 steps) and LDS retrainings (6 x 16 steps, from the window start) take long
# enough to be interrupted mid-way; the window keeps the replay short.
SLOW = ["--preset", "test", "--set", "data.name=synthetic", "--set", "data.num_train=96",
        "--set", "train.epochs=12", "--set", "train.batch_size=12",
        "--set", "replay.checkpoint_every=24", "--set", "replay.start_step=80",
        "--set", "model.name=mlp"]


def _sigint_default() -> None:
    """A child started from a shell job may inherit SIGINT ignored; Python then never raises
    KeyboardInterrupt. Users' terminals deliver it, so restore the default for the test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def interrupt(args: list, at_work, sig: int = signal.SIGINT) -> subprocess.CompletedProcess:
    """Start `fastreplay ARGS`, wait until ``at_work(pid)`` says it is working, press Ctrl-C
    (or send ``sig``)."""
    proc = fastreplay(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                      preexec_fn=_sigint_default)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not at_work(proc.pid):
        assert time.monotonic() < deadline, "the command never got to work"
        time.sleep(0.002)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


def holds(run_dir: Path, inside: str):
    """True once this pid holds ``run_dir`` and RUN_DIR/``inside`` exists (it is at work)."""
    def check(pid: int) -> bool:
        with contextlib.suppress(OSError):
            return ((run_dir / ".lock").read_text().strip() == str(pid)
                    and (run_dir / inside).exists())
        return False
    return check


def interrupted_line(proc, logged: bool = False, code: int = 130) -> str:
    """Exit ``code`` (130: Ctrl-C) and the line saying so; nothing else on stderr unless the
    command ``logged``."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr and (logged or len(lines) == 1), proc.stderr
    return lines[-1]


def test_ctrl_c_in_magic_and_lds_exits_130_and_the_rerun_resumes(tmp_path):
    run_dir = tmp_path / "run"
    magic = ["magic", *SLOW, "--targets", "0", "--no-plots", "--log-level", "ERROR",
             "--run-dir", run_dir]
    proc = interrupt(magic, holds(run_dir, "run.zarr/checkpoints"))  # mid-training
    assert interrupted_line(proc) == ("interrupted; rerun the same command to resume (what is "
                                      f"stored in {run_dir} is kept)")
    assert proc.stdout == ""
    assert fastreplay(*magic).returncode == 0

    # train --run-dir stores the run as magic does, so it resumes too
    trained = tmp_path / "trained"
    train = ["train", *SLOW, "--log-level", "ERROR", "--run-dir", trained]
    proc = interrupt(train, holds(trained, "run.zarr/checkpoints"))
    assert interrupted_line(proc) == ("interrupted; rerun the same command to resume (what is "
                                      f"stored in {trained} is kept)")
    assert fastreplay(*train).returncode == 0

    lds = ["lds", "--run-dir", run_dir, "--models", "6", "--models-per-batch", "1", "--keep",
           "0.9", "--no-plots", "--json", "--log-level", "ERROR"]
    proc = interrupt(lds, holds(run_dir, "run.zarr/lds/weight_keep0.9/values"))  # mid-retraining
    assert interrupted_line(proc).startswith("interrupted; rerun the same command to resume")
    assert proc.stdout == ""  # no half JSON
    done = fastreplay(*lds)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["models"] == 6
    store = RunStore.open(run_dir / "run.zarr", "r")
    assert store.status == "trained" and store.read_scores("loss_from80")[1]["targets"] == [0]
    store.close()


def test_sigterm_is_handled_as_ctrl_c_and_the_rerun_resumes_bitwise(tmp_path):
    """`kill`, a scheduler's time limit: exit 143 with the line naming the resume (it used to
    exit 143 in silence), and the resumed run equals an uninterrupted one bit for bit."""
    run_dir, whole = tmp_path / "run", tmp_path / "whole"
    magic = ["magic", *SLOW, "--targets", "0", "--no-plots", "--log-level", "ERROR"]
    proc = interrupt([*magic, "--run-dir", run_dir], holds(run_dir, "run.zarr/checkpoints"),
                     signal.SIGTERM)
    assert interrupted_line(proc, code=143) == (
        f"terminated (SIGTERM); rerun the same command to resume (what is stored in {run_dir} "
        "is kept)")
    for d in (run_dir, whole):
        assert fastreplay(*magic, "--run-dir", d).returncode == 0
    stores = [RunStore.open(d / "run.zarr", "r") for d in (run_dir, whole)]
    for a, b in zip(*(s.read_final() for s in stores)):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(*(s.read_scores("loss_from80")[0] for s in stores))
    for s in stores:
        s.close()


def test_ctrl_c_in_train_exits_130_and_says_nothing_is_stored(tmp_path):
    log_file = tmp_path / "train.log"

    def training(pid: int) -> bool:
        return log_file.exists() and "retraining" in log_file.read_text()

    proc = interrupt(["train", *SLOW, "--set", "train.epochs=400", "--measure", "0",
                      "--log-level", "DEBUG", "--log-file", log_file], training)
    assert interrupted_line(proc, logged=True) == ("interrupted; `fastreplay train` stores "
                                                   "nothing: rerun it to start again")


def test_interrupted_training_stops_its_writer_before_the_lock_is_released(tmp_path, monkeypatch):
    """Ctrl-C mid-training: the checkpoints already handed to the background writer are written
    and the writer stops before the run directory's lock goes (no write after it, none lost)."""
    import threading

    import fastreplay.core.train as train_mod
    from fastreplay.interface.api import open_or_train

    def slow_checkpoint(self, *args, _real=RunStore._write_checkpoint_now):
        time.sleep(0.2)  # the writer still busy when Ctrl-C comes
        _real(self, *args)

    def ctrl_c_at_step_8(recipe, state, weights, stop, on_step=None, _real=train_mod.run_steps,
                         **kwargs):
        def step(st):
            on_step(st)
            if st.step == 8:
                raise KeyboardInterrupt
        return _real(recipe, state, weights, stop, on_step=step, **kwargs)

    monkeypatch.setattr(RunStore, "_write_checkpoint_now", slow_checkpoint)
    monkeypatch.setattr(train_mod, "run_steps", ctrl_c_at_step_8)
    monkeypatch.setattr("fastreplay.interface.api.train_into_store", train_mod.train_into_store)

    def writers() -> set:  # stores other tests left open keep theirs: count only new ones
        return {t for t in threading.enumerate() if t.name == "fastreplay-writer" and t.is_alive()}
    before = writers()
    with pytest.raises(KeyboardInterrupt):
        open_or_train(load_config("test", None, CONFIG[3::2]), tmp_path / "run")
    assert not writers() - before
    take = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)")  # another process gets the lock
    subprocess.run([sys.executable, "-c", take, str(tmp_path / "run" / ".lock")], check=True,
                   timeout=60)
    store = RunStore.open(tmp_path / "run" / "run.zarr", "r")
    assert list(store.checkpoint_steps()[:3]) == [0, 4, 8]  # all three handed over are stored
    store.close()


# --- where the output goes: closed or full stdout, an unwritable log, ~ in paths ----------------

def test_output_that_cannot_be_written_is_an_error_not_a_silent_success(tmp_path):
    """`info --json >&-` used to exit 0 with the output lost; a full disk for stdout or for the
    --log-file is an error too (the log file's before any work: no run directory is made)."""
    def close_stdout():
        _sigint_default()
        os.close(1)

    def without_stdout(*args) -> subprocess.CompletedProcess:
        proc = fastreplay(*args, stdout=None, stderr=subprocess.PIPE, preexec_fn=close_stdout)
        _, err = proc.communicate(timeout=120)
        return subprocess.CompletedProcess(args, proc.returncode, "", err)

    closed = without_stdout("info", "--json")
    # refused before any work: no training whose summary would then be lost
    closed_magic = without_stdout("magic", *CONFIG, "--targets", "0", "--json", "--run-dir",
                                  tmp_path / "run2")
    assert error_line(closed_magic) == error_line(closed)
    assert not (tmp_path / "run2").exists()
    with open("/dev/full", "w") as full:
        filled = fastreplay("show-config", "--preset", "test", stdout=full, stderr=subprocess.PIPE)
        _, err = filled.communicate(timeout=120)
    filled = subprocess.CompletedProcess([], filled.returncode, "", err)
    log = fastreplay("magic", *CONFIG, "--targets", "0", "--run-dir", tmp_path / "run",
                     "--log-file", "/dev/full")
    assert error_line(closed) == ("error: stdout is closed, so the command's output cannot be "
                                  "written; run it with stdout open (or redirected to a file)")
    assert error_line(filled) == (
        "error: cannot write the command's output to stdout (No space left on device); redirect "
        "it to a file on a disk with free space, or read the whole pipe")
    assert error_line(log) == ("error: --log-file /dev/full: cannot write to it (No space left "
                               "on device); choose another path")
    assert not (tmp_path / "run").exists()


def test_a_log_file_that_fills_up_midway_is_reported(tmp_path, monkeypatch, capsys):
    """A log file that takes its first line and then fails (the disk fills): the command still
    finishes its work, and exits 2 with a line saying the log is incomplete."""
    import errno
    import io

    from fastreplay import progress

    class Full(io.StringIO):
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    def emit(self, record, _real=progress._LogFile.emit):
        if "trained" in record.getMessage():
            self.stream = Full()  # the disk fills up after training
        _real(self, record)

    monkeypatch.setattr(progress._LogFile, "emit", emit)
    code, err = _main(monkeypatch, capsys, "train", *TINY, "--run-dir", tmp_path / "run",
                      "--log-level", "INFO", "--log-file", tmp_path / "log.txt")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"error: --log-file {tmp_path / 'log.txt'}: writing the log failed (No space left on "
        "device); the log is incomplete: free space or choose another path, then rerun")
    assert RunStore.open(tmp_path / "run" / "run.zarr", "r").status == "trained"


def test_tilde_in_a_path_is_the_home_directory_the_log_names(tmp_path):
    """`--run-dir '~/runs/a'` (quoted, so the shell left it) made a directory literally named ~
    while the log said ~/run.zarr; it is the home directory, as a shell would have expanded."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "fastreplay.interface.cli", "magic", *CONFIG,
                           "--targets", "0", "--no-plots", "--json", "--run-dir", "~/runs/a",
                           "--scores-out", "~/scores.npy", "--log-level", "INFO"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["store"] == str(home / "runs" / "a" / "run.zarr")
    assert out["scores_out"] == str(home / "scores.npy") and (home / "scores.npy").is_file()
    assert RunStore.open(home / "runs" / "a" / "run.zarr", "r").status == "trained"
    assert list(work.iterdir()) == []  # no ./~


def test_a_task_that_calls_sys_exit_midway_is_reported(tmp_path):
    """sys.exit(3) inside the task's code during training used to end the process with code 3
    and no word; it is a one-line error, and what was stored stays."""
    task = tmp_path / "exits.py"
    task.write_text(
        "import sys\n"
        "import numpy as np\n"
        "import torch.nn as nn\n"
        "from fastreplay.task import ArrayData, Task\n"
        "def augment(x, seed, step):\n"
        "    if step == 2:\n"
        "        sys.exit(3)\n"
        "    return x\n"
        "def make_task():\n"
        "    rng = np.random.default_rng(0)\n"
        "    x, y = rng.normal(size=(24, 4)).astype('float32'), rng.integers(0, 2, 24)\n"
        "    return Task(model=lambda: nn.Linear(4, 2), augment=augment,\n"
        "                data=ArrayData(x, y, x[:4], y[:4]))\n")
    run = tmp_path / "run"
    line = error_line(fastreplay("magic", "--preset", "test", "--set", "train.batch_size=6",
                                 "--targets", "0", "--run-dir", run, "--task", f"{task}:make_task"))
    assert line == (f"error: the task's code called sys.exit(3) during `fastreplay magic`, which "
                    f"stops here (what is stored in {run} is kept); remove the sys.exit call from "
                    "the task (raise an exception to report a problem)")
    assert (run / "run.zarr").is_dir()


# --- disk full, seen from outside the process --------------------------------------------------

# Loaded at start-up through PYTHONPATH (sitecustomize): a full disk for one score chunk, and
# score writes that keep zarr's event-loop thread busy (as a slow disk or a loaded machine do).
# With more new score rows (12) than zarr writes at once (10), chunk writes are still pending
# when the error reaches the user: unsettled, they ended as asyncio noise after the error line.
ENOSPC_HOOK = '''
import errno, os, time
if os.environ.get("TEST_ENOSPC_ON"):
    import fastreplay.store.diskio as diskio
    fragment = os.environ["TEST_ENOSPC_ON"]
    write_file, store_set = diskio._write_file, diskio.SafeLocalStore.set

    def full_disk(path, data):
        if fragment in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_file(path, data)

    async def busy_set(self, key, value):
        if key.startswith("scores/"):
            time.sleep(0.3)
        await store_set(self, key, value)

    diskio._write_file, diskio.SafeLocalStore.set = full_disk, busy_set
'''


def test_disk_full_in_a_real_process_is_exactly_one_line(scored_run, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(scored_run, run_dir)
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(ENOSPC_HOOK)
    magic = ["magic", *CONFIG, "--set", "replay.target_batch=16", "--targets", "0:14",
             "--no-plots", "--log-level", "ERROR", "--run-dir", run_dir]
    with monkeypatch.context() as env:
        env.setenv("PYTHONPATH", str(tmp_path / "hook"))
        env.setenv("TEST_ENOSPC_ON", "scores/loss/c/3/")
        line = error_line(fastreplay(*magic))
    assert line.startswith(f"error: disk full while writing scores/loss/c/3/0 in {run_dir}")
    assert fastreplay(*magic).returncode == 0  # space is back: the same command finishes


# --- misleading output -------------------------------------------------------------------------

def test_scores_out_reports_the_file_numpy_writes(scored_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(scored_run, run_dir)
    proc = fastreplay("magic", *CONFIG, "--targets", "0", "--no-plots", "--json", "--log-level",
                      "INFO", "--run-dir", run_dir, "--scores-out", tmp_path / "noext")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["scores_out"] == str(tmp_path / "noext.npy")
    assert np.load(tmp_path / "noext.npy").shape == (1, 96) and not (tmp_path / "noext").exists()
    assert "noext.npy" in " ".join(proc.stderr.split())  # the log line names it too


def _commands() -> dict:
    return typer.main.get_command(app).commands


def _help(command: str) -> str:
    from typer.testing import CliRunner
    res = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())


@pytest.mark.parametrize("command", sorted(_commands()))
def test_help_shows_every_bracketed_word(command):
    """Help texts are rich markup: an unescaped "[data]" is taken for a style and vanishes."""
    shown = _help(command)
    for param in _commands()[command].params:
        for word in re.findall(r"\[[a-z]+\]", getattr(param, "help", None) or ""):
            assert word in shown, (param.name, word)


# --- which command takes which option: the README table is the truth ---------------------------

def _readme_options_table() -> dict[str, set[str]]:
    """README's "Options of each command" table: {command: {option, ...}}."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("| option | magic |"):]
    rows = [r for r in block.split("\n\n")[0].splitlines() if r.startswith("|")]
    commands = [c.strip(" `") for c in rows[0].strip("|").split("|")[1:]]
    out: dict[str, set[str]] = {c: set() for c in commands}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for option in re.findall(r"--[a-z-]+", cells[0]):
            for command, cell in zip(commands, cells[1:]):
                if cell == "yes":
                    out[command].add(option)
    return out


def test_readme_says_which_command_takes_which_option():
    table = _readme_options_table()
    documented = set().union(*table.values())
    assert set(table) == set(_commands())
    for name, command in _commands().items():
        has = {o for p in command.params for o in p.opts if o in documented}
        assert has == table[name], name


# --- guard: hostile values everywhere, never a traceback ---------------------------------------

HOSTILE = ["", "-1", "nan", "1e999", "99999999999999999999", "{binary}", "{missing}"]

# Two training steps: what a hostile value lets through runs in a blink.
TINY = ["--preset", "test", "--set", "data.name=synthetic", "--set", "data.num_train=24",
        "--set", "train.epochs=1", "--set", "train.batch_size=12", "--set", "model.name=mlp"]


def _value_params(command) -> list:
    """Options and arguments that take a value (flags have nothing to be hostile with)."""
    return [p for p in command.params
            if not getattr(p, "is_flag", False) and not getattr(p, "count", False)
            and p.name != "help"]


def _sweep_base(command: str, scored: Path, empty: Path) -> list[str]:
    """Valid arguments, cheap when a hostile value is accepted (tiny runs, no benchmark)."""
    return {
        "magic": ["--targets", "0", "--run-dir", str(scored), *TINY, "--no-plots"],
        "train": ["--measure", "0", *TINY],
        "lds": ["--run-dir", str(scored), "--models", "3", "--models-per-batch", "3", "--keep",
                "0.5", "--no-plots"],
        "smoothness": ["--run-dir", str(scored), "--keep", "0.5"],
        "window": ["--run-dir", str(scored), "--keep", "0.5", "--no-plots"],
        "debug": ["--run-dir", str(scored), "--group", "0:2", "--top", "2", "--no-plots"],
        "compare": ["--run-dir", str(scored), "--methods", "magic,gradsim", "--keep", "0.5",
                    "--no-plots"],
        # seed=-1 fails once the options are checked, so no benchmark ever runs
        "bench": ["replay", "--device", "cpu", "--targets", "1", "--preset", "test",
                  "--set", "seed=-1"],
        "show-config": [],
        "clean": [str(empty)],  # an empty directory: nothing is ever deleted
        "info": [],
    }[command]


def _with_value(base: list[str], param, value: str) -> list[str]:
    """``base`` with ``param`` set to ``value`` (replacing its value in base, unless the option
    repeats)."""
    if param.param_type_name == "argument":
        return [value, *(base[1:] if base and not base[0].startswith("-") else base)]
    out, skip = [], False
    for a in base:
        if skip:
            skip = False
        elif a in param.opts and not param.multiple:
            skip = True
        else:
            out.append(a)
    return [*out, param.opts[0], value]


def _quiet(command, param, argv: list[str]) -> list[str]:
    """argv with --log-level ERROR where the command has it and the sweep is not testing it."""
    opts = {o for p in command.params for o in p.opts}
    return argv + ["--log-level", "ERROR"] if "--log-level" in opts and \
        "--log-level" not in param.opts else argv


def _hostile_sweep(monkeypatch, capsys, tmp_path, base_args, commands=None,
                   more=None) -> list[str]:
    """Every value option of ``commands`` (default: all) x HOSTILE (and the values ``more``
    gives an option, by its name), each on top of the valid ``base_args(command)``, through
    main() in this process: the runs that did not end in exit 0, 2 or 130, ended in an
    exception (what a user sees as a traceback), or exited 2 without exactly one error line."""
    files = {"binary": tmp_path / "binary.bin", "missing": tmp_path / "missing" / "x"}
    files["binary"].write_bytes(bytes(range(256)) * 4)
    failures = []
    for name, command in sorted(_commands().items()):
        if commands is not None and name not in commands:
            continue
        for param in _value_params(command):
            for raw in HOSTILE + (more or {}).get(param.opts[0], []):
                value = _fill([raw], files)[0]
                argv = [name, *_quiet(command, param, _with_value(base_args(name), param, value))]
                try:
                    code, err = _main(monkeypatch, capsys, *argv)
                except BaseException as exc:  # noqa: BLE001 - what a user would see as a traceback
                    failures.append(f"{argv}: {type(exc).__name__}: {exc}")
                    continue
                lines = [x for x in err.splitlines() if x.strip()]
                if code not in (0, 2, 130) or "Traceback" in err or (
                        code == 2 and (len(lines) != 1 or not lines[0].startswith("error: "))):
                    failures.append(f"{argv}: exit {code}\n{err[-2000:]}")
    return failures


def test_hostile_values_never_end_in_a_traceback(tmp_path, monkeypatch, capsys):
    """Every value option of every command x hostile values: exit 0, 2 or 130, never an
    exception out of main() (what prints a traceback), and exit 2 comes with one error line.
    In-process through main() to stay fast; the processes above show main() is what users get."""
    monkeypatch.chdir(tmp_path)  # values such as "" or "-1" become paths here
    (tmp_path / "empty").mkdir()
    scored = tmp_path / "scored"
    assert _main(monkeypatch, capsys, "magic", *TINY, "--targets", "0", "--no-plots",
                 "--log-level", "ERROR", "--run-dir", scored)[0] == 0
    assert _main(monkeypatch, capsys, "lds", "--run-dir", scored, "--models", "3", "--keep",
                 "0.5", "--no-plots", "--log-level", "ERROR")[0] == 0  # for compare
    failures = _hostile_sweep(monkeypatch, capsys, tmp_path,
                              lambda name: _sweep_base(name, scored, tmp_path / "empty"))
    assert not failures, "\n".join(failures)


TASK_SPEC = f"{REPO / 'tests' / 'tasks' / 'tabular_task.py'}:make_task"
# The tabular task (48 examples): one epoch of 4 steps.
TASK_TINY = ["--task", TASK_SPEC, "--preset", "test", "--set", "train.epochs=1",
             "--set", "train.batch_size=12"]
TASK_COMMANDS = ("magic", "train", "lds", "smoothness", "window", "debug", "compare")
"""The commands that take --task."""


def test_hostile_values_with_an_own_task_never_end_in_a_traceback(tmp_path, monkeypatch, capsys):
    """The same sweep where the run is a user's own task (--task, including hostile --task
    values): the commands that build the run from it, on a scored run of the task."""
    monkeypatch.chdir(tmp_path)
    scored = tmp_path / "scored"
    assert _main(monkeypatch, capsys, "magic", *TASK_TINY, "--targets", "0:2", "--no-plots",
                 "--log-level", "ERROR", "--run-dir", scored)[0] == 0
    task = ["--task", TASK_SPEC]
    assert _main(monkeypatch, capsys, "lds", "--run-dir", scored, *task, "--models", "3",
                 "--keep", "0.5", "--no-plots", "--log-level", "ERROR")[0] == 0  # for compare
    bases = {
        "magic": ["--targets", "0", "--run-dir", str(scored), *TASK_TINY, "--no-plots"],
        "train": ["--measure", "0", *TASK_TINY],
        "lds": ["--run-dir", str(scored), *task, "--models", "3", "--models-per-batch", "3",
                "--keep", "0.5", "--no-plots"],
        "smoothness": ["--run-dir", str(scored), *task, "--keep", "0.5"],
        "window": ["--run-dir", str(scored), *task, "--keep", "0.5", "--no-plots"],
        "debug": ["--run-dir", str(scored), *task, "--group", "0:2", "--top", "2", "--no-plots"],
        "compare": ["--run-dir", str(scored), *task, "--methods", "magic,gradsim", "--keep",
                    "0.5", "--no-plots"],
    }
    assert set(bases) == {n for n, c in _commands().items()
                          if any("--task" in p.opts for p in c.params)}
    # FILE:FUNCTION specs of hostile files and functions: binary, missing, not a function, a
    # function returning no Task, a config file
    module = TASK_SPEC.rpartition(":")[0]
    specs = ["{binary}:make_task", "{missing}.py:make_task", f"{module}:FEATURES",
             f"{module}:model", f"{REPO / 'examples' / 'digits_mlp.toml'}:make_task"]
    np.save(tmp_path / "floats.npy", np.array([0.0, 1.5]))  # --group ids that are no ids
    failures = _hostile_sweep(monkeypatch, capsys, tmp_path, lambda name: bases[name],
                              TASK_COMMANDS, {"--task": specs,
                                              "--group": [str(tmp_path / "floats.npy")]})
    assert not failures, "\n".join(failures)


def _sweep_failure(setting: str, call, refusal) -> str | None:
    """What is wrong with ``call()`` for one hostile ``setting``: None when it returns or raises
    ``refusal`` with a one-line message; else the problem, for the sweep's report."""
    try:
        call()
    except refusal as exc:
        return f"{setting}: message of several lines" if "\n" in str(exc) else None
    except BaseException as exc:  # noqa: BLE001 - what a user would see as a traceback
        return f"{setting}: {type(exc).__name__}: {exc}"
    return None


def test_every_config_key_refuses_hostile_values_with_a_config_error():
    """The same sweep over every config key through --set (load_config, no process needed)."""
    failures = [_sweep_failure(f"{key}={value!r}",
                               lambda: load_config("test", None, [f"{key}={value}"]), ConfigError)
                for key, value in _hostile_settings()]
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)


def test_every_config_key_with_a_hostile_value_builds_an_own_task_run_or_refuses_it():
    """Each config key set to each hostile value (and to 0, 1 and 2) that load_config lets
    through, for a user's own task: building the Recipe (its data on the device, its model
    tried) works or raises a FastReplayError of one line, never another exception."""
    from fastreplay.core.recipe import Recipe
    from fastreplay.exceptions import FastReplayError
    from fastreplay.task import load_task

    task = load_task(TASK_SPEC)
    failures, built = [], []
    edges = [(key, value) for key, _ in _hostile_settings()[::len(HOSTILE_SETTINGS)]
             for value in ("0", "1", "2")]  # the smallest sizes, rates and seeds it accepts
    for key, value in _hostile_settings() + edges:
        try:
            cfg = load_config("test", None, [f"{key}={value}"])
        except ConfigError:
            continue
        failures.append(_sweep_failure(f"{key}={value!r}",
                                       lambda: built.append(Recipe(cfg, task=task) and key),
                                       FastReplayError))
    failures = [f for f in failures if f]
    assert not failures, "\n".join(failures)
    assert built  # some of them were runs, not refusals


HOSTILE_SETTINGS = ["", "-1", "nan", "inf", "-inf", "1e999", "99999999999999999999",
                    "1" + "0" * 400, "[1]", "{a=1}", "true", '"x"', "\x00"]


def _hostile_settings() -> list[tuple[str, str]]:
    """(config key, hostile value) for every key."""
    keys = [f"{s}.{k}" if s else k for s, fields in _config_keys().items() for k in fields]
    return [(key, value) for key in keys for value in HOSTILE_SETTINGS]


def _config_keys() -> dict[str, list[str]]:
    d = RunConfig().to_dict()
    out = {"": [k for k, v in d.items() if not isinstance(v, dict)]}
    out.update({k: list(v) for k, v in d.items() if isinstance(v, dict)})
    return out
