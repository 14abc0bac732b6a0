"""Crash safety, resumability, the run-directory lock and clear errors on bad input.

The crash tests SIGKILL real `python -m fastreplay.interface.cli magic|lds` processes, either at named
points (FASTREPLAY_CRASH_AT="point:count", see fastreplay/faults.py) or at a random moment, rerun
the same command until it completes, and require the stored results to be bitwise equal
(np.array_equal) to an uninterrupted run: scores, every checkpoint, the final state, LDS values.
The bad-input tests require exit code 2, a single `error: ...` line on stderr and no loss of what
the store held before.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastreplay.store import RunDirLock, RunStore

REPO = Path(__file__).resolve().parents[1]

# Small float64 synthetic run (an MLP: a whole `magic` run takes ~1 s after start-up):
# 24 steps, checkpoints every 4 steps (6 slots), 4 targets replayed one at a time.
CONFIG = ["--preset", "test", "--set", "data.name=synthetic", "--set", "data.num_train=96",
          "--set", "train.epochs=3", "--set", "train.batch_size=12",
          "--set", "replay.checkpoint_every=4", "--set", "replay.target_batch=1",
          "--set", "model.name=mlp"]


def magic_args(targets: str = "0:4", level: str = "WARNING") -> list[str]:
    return ["magic", *CONFIG, "--targets", targets, "--no-plots", "--log-level", level]


MAGIC = magic_args()
LDS = ["lds", "--models", "4", "--keep", "0.9", "--no-plots", "--json", "--log-level", "WARNING"]
KILLED = -signal.SIGKILL


def fastreplay(*args, crash: str | None = None, timeout: float = 300, **popen):
    """Run `python -m fastreplay.interface.cli ARGS` (optionally with a crash point armed)."""
    env = {k: v for k, v in os.environ.items() if k != "FASTREPLAY_CRASH_AT"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if crash:
        env["FASTREPLAY_CRASH_AT"] = crash
    cmd = [sys.executable, "-m", "fastreplay.interface.cli", *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, env=env, cwd=REPO, text=True, **popen)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def fastreplay_all(*calls: tuple, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run independent commands concurrently (each call: a tuple of CLI arguments)."""
    procs = [fastreplay(*args, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for args in calls]
    out = []
    for args, proc in zip(calls, procs):
        stdout, stderr = proc.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(args, proc.returncode, stdout, stderr))
    return out


def ok(proc) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    return proc


def snapshot(run_dir: Path) -> dict:
    """Everything a run stores, as numpy arrays (read through the verifying reader)."""
    store = RunStore.open(Path(run_dir) / "run.zarr", mode="r")
    out = {"status": store.status}
    out["final"] = store.read_final()
    out["checkpoints"] = [store.read_checkpoint(s) for s in range(len(store.checkpoint_steps()))]
    out["schedule"] = store.read_schedule()
    if "loss" in store.score_names():
        out["scores"], attrs = store.read_scores("loss")
        out["targets"] = attrs["targets"]
    if store.lds_groups():
        out["lds"] = store._group["lds/weight_keep0.9/values"][...]
    store.close()
    return out


def assert_same(got: dict, want: dict, keys=("final", "checkpoints", "schedule", "scores")) -> None:
    assert got["status"] == want["status"] == "trained"
    for key in keys:
        a, b = got[key], want[key]
        if key == "checkpoints":
            assert len(a) == len(b)
            for (sa, *xa), (sb, *xb) in zip(a, b):
                assert sa == sb and all(np.array_equal(x, y) for x, y in zip(xa, xb, strict=True)), key
        elif isinstance(a, tuple):
            assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)), key
        else:
            assert np.array_equal(a, b), key
    if "scores" in keys:
        assert got["targets"] == want["targets"]


def assert_clean(run_dir: Path) -> None:
    """No temporary file or directory survives a completed run."""
    leftovers = [p for p in Path(run_dir).rglob("*") if p.name.endswith(".partial")]
    leftovers += [p for p in Path(run_dir).iterdir() if p.name.startswith(".run.zarr.")]
    assert not leftovers, leftovers


def error_line(proc) -> str:
    """The CLI's contract for bad input: exit 2 and exactly one `error: ...` line, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    """One uninterrupted `magic` run and one uninterrupted `lds` run on a copy of it."""
    root = tmp_path_factory.mktemp("baseline")
    ok(fastreplay(*MAGIC, "--run-dir", root / "run", "--scores-out", root / "scores.npy"))
    shutil.copytree(root / "run", root / "lds")
    lds_out = ok(fastreplay(*LDS, "--run-dir", root / "lds")).stdout.strip().splitlines()[-1]
    return {"dir": root / "run", "magic": snapshot(root / "run"), "lds": snapshot(root / "lds"),
            "lds_json": json.loads(lds_out), "scores_npy": np.load(root / "scores.npy")}


def scored_copy(baseline, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(baseline["dir"], dst)
    return dst


# --- SIGKILL at named points -------------------------------------------------------------------

# One `magic` command killed again and again, each rerun resuming from what the previous ones
# stored: creating the store, mid-training, between checkpoints, mid-checkpoint, mid-file-write,
# around the final state and the "trained" commit, mid-replay, between score rows and commit.
MAGIC_CRASHES = [
    "store_creating:1",      # store built under its temporary name, not renamed yet
    "checkpoint_written:2",  # right after a checkpoint commit
    "checkpoint_partial:1",  # params/momentum of a checkpoint written, commit marker not
    "train_step:6",          # between two checkpoints
    "store_write:4",         # a store file written to its temporary name, not renamed
    "final_partial:1",       # final params written, buffers/checksum not
    "final_written:1",       # final state flushed, status not "trained" yet
    "trained:1",             # status "trained", before the replay
    "rebuild_step:10",       # mid-replay (rebuilding segments for target 0)
    "scores_partial:1",      # score row written, target list not committed
    "replay_chunk:2",        # two score chunks committed
    "store_write:2",         # a score row file written to its temporary name, not renamed
]


def kill_at_each_then_finish(args: list, run_dir: Path, points: list[str], *finish: str) -> None:
    """Run ``args`` killed at each crash point in turn (each rerun resuming the last), then once
    to completion with the extra arguments ``finish``."""
    for point in points:
        proc = fastreplay(*args, "--run-dir", run_dir, crash=point)
        assert proc.returncode == KILLED, f"{point}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    ok(fastreplay(*args, "--run-dir", run_dir, *finish))


def test_magic_survives_sigkill_at_every_phase(baseline, tmp_path):
    run_dir = tmp_path / "run"
    kill_at_each_then_finish(MAGIC, run_dir, MAGIC_CRASHES, "--scores-out", tmp_path / "scores.npy")
    assert_same(snapshot(run_dir), baseline["magic"])
    assert np.array_equal(np.load(tmp_path / "scores.npy"), baseline["scores_npy"])
    assert_clean(run_dir)


LDS_CRASHES = [
    "lds_init:1",        # masks written, values array and commit not
    "retrain_step:30",   # mid-retraining of the second subset model
    "lds_model:2",       # two more models stored
]


def test_lds_survives_sigkill(baseline, tmp_path):
    run_dir = scored_copy(baseline, tmp_path)
    for point in LDS_CRASHES:
        proc = fastreplay(*LDS, "--run-dir", run_dir, crash=point)
        assert proc.returncode == KILLED, f"{point}: exit {proc.returncode}\n{proc.stderr[-3000:]}"
    out = json.loads(ok(fastreplay(*LDS, "--run-dir", run_dir)).stdout.strip().splitlines()[-1])
    got, want = snapshot(run_dir), baseline["lds"]
    assert_same(got, want, keys=("final", "scores", "lds"))
    for key in ("lds_mean", "lds_ci", "per_target"):
        assert out[key] == baseline["lds_json"][key], key
    assert_clean(run_dir)


def test_sigkill_at_random_moments(baseline, tmp_path):
    """A real timer, no hook: kill `magic` at seeded random moments after it took its run dir.

    The lock file names the holder's pid once the process has opened the run directory (past
    start-up), so the kills land in training or replay, not in the imports. Each rerun resumes;
    the last one finishes.
    """
    rng = np.random.default_rng(7)
    run_dir = tmp_path / "run"
    kills, window = 0, 0.8
    for _ in range(10):
        proc = fastreplay(*MAGIC, "--run-dir", run_dir, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while proc.poll() is None:
            with contextlib.suppress(OSError):
                if (run_dir / ".lock").read_text().strip() == str(proc.pid):
                    break
            assert time.monotonic() < deadline, "magic never took its run directory"
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, window))
        proc.send_signal(signal.SIGKILL)  # a no-op if it has finished
        _, stderr = proc.communicate(timeout=120)
        if proc.returncode == KILLED:
            kills += 1
            if kills == 3:
                break
            continue
        assert proc.returncode == 0, stderr[-3000:]
        if kills:
            break  # killed, resumed and finished
        shutil.rmtree(run_dir)  # finished before the first kill: start again, kill sooner
        window /= 2
    assert kills >= 1
    ok(fastreplay(*MAGIC, "--run-dir", run_dir))
    assert_same(snapshot(run_dir), baseline["magic"])
    assert_clean(run_dir)


# --- the run-directory lock ----------------------------------------------------------------------

def test_second_process_is_refused_while_the_first_holds_the_run_dir(baseline, tmp_path):
    run_dir = scored_copy(baseline, tmp_path)
    lock = RunDirLock(run_dir)  # this test process plays the first fastreplay process
    try:
        for proc in fastreplay_all((*MAGIC, "--run-dir", run_dir), (*LDS, "--run-dir", run_dir)):
            assert error_line(proc) == (
                f"error: run directory {run_dir} is in use by another fastreplay process "
                f"(pid {os.getpid()}); wait for it or use another --run-dir")
    finally:
        lock.release()
    assert_same(snapshot(run_dir), baseline["magic"])
    # Released (as it is when its holder dies, even by SIGKILL): another process may take it.
    take = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)")
    subprocess.run([sys.executable, "-c", take, str(run_dir / ".lock")], check=True, timeout=60)


# --- bad input: one line, exit 2, nothing lost ---------------------------------------------------

def test_missing_and_malformed_data(baseline, tmp_path):
    run_dir = scored_copy(baseline, tmp_path)
    bad = tmp_path / "bad" / "cifar-10-batches-py"
    bad.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (bad / name).write_bytes(b"not a pickle")
    cifar = ("magic", "--preset", "quick", "--targets", "0", "--run-dir", run_dir, "--no-plots",
             "--log-level", "WARNING", "--set")
    missing, malformed = map(error_line, fastreplay_all(
        (*cifar, f"data.root={tmp_path / 'nowhere'}"), (*cifar, f"data.root={bad.parent}")))
    assert "CIFAR-10 not found" in missing and "--download" in missing
    assert "unreadable" in malformed and "re-download" in malformed
    assert_same(snapshot(run_dir), baseline["magic"])


def test_store_of_another_config_and_targets_out_of_range(baseline, tmp_path):
    run_dir = scored_copy(baseline, tmp_path)
    other, far = map(error_line, fastreplay_all(
        (*MAGIC, "--set", "train.lr=0.05", "--run-dir", run_dir),
        (*magic_args("0:100"), "--run-dir", run_dir)))
    assert "different config" in other and "--force" in other
    assert "target 64 is out of range" in far
    assert_same(snapshot(run_dir), baseline["magic"])


def test_bad_weights(tmp_path):
    short, nan = tmp_path / "short.npy", tmp_path / "nan.npy"
    np.save(short, np.ones(5))
    w = np.ones(96)
    w[3] = np.nan
    np.save(nan, w)
    lines = list(map(error_line, fastreplay_all(
        ("train", *CONFIG, "--weights", short, "--measure", "0"),
        ("train", *CONFIG, "--weights", nan, "--measure", "0"))))
    assert "shape (5,)" in lines[0] and "96 training examples" in lines[0]
    assert "NaN" in lines[1]


def test_divergence_names_the_step(tmp_path):
    run_dir = tmp_path / "run"
    magic = [*MAGIC, "--set", "train.lr=1e100", "--run-dir", run_dir]
    line, retrain = map(error_line, fastreplay_all(
        magic, ("train", *CONFIG, "--set", "train.lr=1e100", "--measure", "0")))
    assert line.startswith("error: training diverged: non-finite loss at step 2 ")
    assert "train.lr" in line and "--force" in line
    assert "non-finite loss at step 2" in retrain
    store = RunStore.open(run_dir / "run.zarr", "r")
    steps = store.checkpoint_steps()
    assert steps[0] == 0 and (steps[1:] < 0).all()  # no checkpoint after the divergence
    store.close()
    assert error_line(fastreplay(*magic)) == line  # rerun: same answer, resumed from step 0


def _scribble(path: Path, offset: int, n: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + n] = bytes(x ^ 0xFF for x in data[offset:offset + n])
    path.write_bytes(bytes(data))


def test_corrupted_checkpoint_and_final_state_are_refused(baseline, tmp_path):
    ckpt_dir, final_dir = scored_copy(baseline, tmp_path, "ckpt"), scored_copy(baseline, tmp_path, "final")
    _scribble(ckpt_dir / "run.zarr" / "checkpoints" / "params" / "c" / "2" / "0", 100, 4)
    _scribble(final_dir / "run.zarr" / "final" / "params" / "c" / "0", 8, 8)
    # Targets 4 and 5 need the replay, which reads the checkpoints.
    ckpt, final = map(error_line, fastreplay_all((*magic_args("0:6"), "--run-dir", ckpt_dir),
                                                 (*MAGIC, "--run-dir", final_dir)))
    assert "checkpoint slot 2" in ckpt and "corrupted" in ckpt and "--force" in ckpt
    assert "final state" in final and "corrupted" in final and "--force" in final
    # Already stored scores stay readable and unchanged; a command that needs no replay works.
    store = RunStore.open(ckpt_dir / "run.zarr", "r")
    scores, attrs = store.read_scores("loss")
    assert attrs["targets"] == [0, 1, 2, 3] and np.array_equal(scores, baseline["magic"]["scores"])
    store.close()
    ok(fastreplay(*MAGIC, "--run-dir", ckpt_dir))


# --- disk full and read-only run directories (in-process: injected errors) ----------------------

def _main(monkeypatch, capsys, *args) -> tuple[int, str]:
    """The CLI's main() in this process: (exit code, stderr)."""
    from fastreplay.interface.cli import main
    monkeypatch.setattr(sys, "argv", ["fastreplay", *map(str, args)])
    capsys.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().err


def _enospc_on(monkeypatch, fragment: str):
    import fastreplay.store.diskio as store_mod  # _put_atomic looks _write_file up here
    real = store_mod._write_file

    def write(path, data):
        if fragment in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data)

    monkeypatch.setattr(store_mod, "_write_file", write)
    return real


def test_disk_full_is_one_line_and_the_run_resumes(baseline, tmp_path, monkeypatch, capsys):
    import fastreplay.store.diskio as store_mod  # _put_atomic looks _write_file up here
    magic = magic_args(level="ERROR")

    # During training: the background writer fails on the 4th checkpoint.
    run_dir = tmp_path / "train"
    real = _enospc_on(monkeypatch, "checkpoints/params/c/3/")
    code, err = _main(monkeypatch, capsys, *magic, "--run-dir", run_dir)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: disk full while writing checkpoints/params/c/3/0 in ")
    assert "free space" in lines[0] and "resumes" in lines[0]
    monkeypatch.setattr(store_mod, "_write_file", real)
    code, err = _main(monkeypatch, capsys, *magic, "--run-dir", run_dir)
    assert code == 0, err
    assert_same(snapshot(run_dir), baseline["magic"])

    # During the replay: a new score row cannot be written; the stored rows stay as they were.
    run_dir = scored_copy(baseline, tmp_path)
    more = magic_args("0:6", level="ERROR")
    _enospc_on(monkeypatch, "scores/loss/c/")
    code, err = _main(monkeypatch, capsys, *more, "--run-dir", run_dir)
    assert code == 2 and err.strip().startswith("error: disk full while writing scores/loss/c/4/0"), err
    assert_same(snapshot(run_dir), baseline["magic"])
    monkeypatch.setattr(store_mod, "_write_file", real)
    code, err = _main(monkeypatch, capsys, *more, "--run-dir", run_dir)
    assert code == 0, err
    got = snapshot(run_dir)
    assert got["targets"] == [0, 1, 2, 3, 4, 5]
    assert np.array_equal(got["scores"][:4], baseline["magic"]["scores"])
    assert_clean(run_dir)


def test_read_only_run_dir_is_refused_before_any_work(baseline, tmp_path, monkeypatch, capsys):
    run_dir = scored_copy(baseline, tmp_path)
    if os.geteuid() != 0:  # a real read-only directory
        os.chmod(run_dir, 0o555)
        try:
            line = error_line(fastreplay(*MAGIC, "--run-dir", run_dir))
        finally:
            os.chmod(run_dir, 0o755)
    else:  # root writes anyway: simulate EROFS for every file created under the run dir
        real_open = os.open

        def ro_open(path, flags, *args, **kwargs):
            if flags & os.O_CREAT and str(path).startswith(str(run_dir)):
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", ro_open)
        code, err = _main(monkeypatch, capsys, *magic_args(level="ERROR"), "--run-dir", run_dir)
        monkeypatch.setattr(os, "open", real_open)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, err
        line = lines[0]
    assert line.startswith(f"error: run directory {run_dir} is not writable (")
    assert "chmod" in line and "--run-dir" in line
    assert_same(snapshot(run_dir), baseline["magic"])
