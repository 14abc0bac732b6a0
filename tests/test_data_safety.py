"""Nothing a user types may destroy data.

One test per family, through the real CLI (`python -m fastreplay.interface.cli` in a subprocess): empty
path arguments (an unset shell variable), --force and `clean` next to data that fastreplay did
not write, --store URL schemes, checksummed LDS values, and damaged store metadata. Every refusal
is exit code 2 with one `error: ...` line, and every file of the user's is still there, byte for
byte, afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr
from test_robustness import CONFIG, KILLED, REPO, error_line, fastreplay, fastreplay_all, ok

from fastreplay.store import RunStore, discard_store, versions

LDS = ["lds", "--models", "4", "--keep", "0.9", "--no-plots", "--json", "--log-level", "WARNING"]
GROUP = "lds/weight_keep0.9"


def magic(targets: str = "0:2") -> list[str]:
    return ["magic", *CONFIG, "--targets", targets, "--no-plots", "--log-level", "WARNING"]


def fastreplay_in(cwd: Path, *args) -> subprocess.CompletedProcess:
    """`python -m fastreplay.interface.cli ARGS` run in ``cwd`` (where an empty path would point)."""
    env = {k: v for k, v in os.environ.items() if k != "FASTREPLAY_CRASH_AT"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return subprocess.run([sys.executable, "-m", "fastreplay.interface.cli", *map(str, args)], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def tree(root: Path) -> dict:
    """Every entry under ``root`` (symlinks not followed): file bytes, "<dir>" or the link target."""
    out = {}
    for path in sorted(Path(root).rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"-> {os.readlink(path)}"
        elif path.is_dir():
            out[rel] = "<dir>"
        else:
            out[rel] = path.read_bytes()
    return out


def user_files(root: Path) -> dict:
    """A user's own files (a note, a data folder, a hidden file) written under ``root``."""
    files = {"notes.txt": b"my notes\n", "data/x.bin": bytes(range(256)), ".mine.tmp": b"keep"}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def fake_run_store(path: Path) -> None:
    """A run store as far as its identity goes (no training needed to be deleted)."""
    store = RunStore.create(path, {"model": "mlp"}, "fp", versions())
    store.allocate(num_steps=4, batch_size=2, num_groups=1, num_checkpoints=2, num_params=3,
                   num_buffers=0, dtype="float64")
    store.close()


def assert_kept(root: Path, files: dict) -> None:
    for rel, data in files.items():
        assert (root / rel).read_bytes() == data, rel


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """A trained run scored for targets 0, 1, with one finished 4-model LDS experiment."""
    root = tmp_path_factory.mktemp("scored")
    run = root / "run"
    ok(fastreplay(*magic(), "--run-dir", run, "--scores-out", root / "scores.npy"))
    out = json.loads(ok(fastreplay(*LDS, "--run-dir", run)).stdout.strip().splitlines()[-1])
    store = RunStore.open(run / "run.zarr", "r")
    values = store._group[f"{GROUP}/values"][...]
    store.close()
    return {"dir": run, "scores": np.load(root / "scores.npy"), "lds": out, "values": values}


def copy_of(scored, tmp_path: Path, name: str = "run") -> Path:
    dst = tmp_path / name
    shutil.copytree(scored["dir"], dst)
    return dst


def lds_json(proc) -> dict:
    out = json.loads(ok(proc).stdout.strip().splitlines()[-1])
    out.pop("seconds")
    return out


# --- 1. empty path arguments -----------------------------------------------------------------

def test_empty_paths_are_refused_before_anything_is_read_written_or_deleted(tmp_path):
    """`"$RUN"` with RUN unset is "": Typer would make it ".", the current directory, where
    `clean --what all` deleted everything and `magic` wrote its run."""
    work = tmp_path / "work"
    work.mkdir()
    user_files(work)
    fake_run_store(work / "run.zarr")  # so that "." looks like a run directory
    before = tree(work)
    run = tmp_path / "r"
    cases = {
        ("clean", "", "--what", "all"): "RUN_DIR '' is empty",
        ("clean", "  ", "--what", "all"): "RUN_DIR '  ' is blank",
        ("magic", *CONFIG, "--targets", "0", "--run-dir", ""): "--run-dir '' is empty",
        ("lds", "--run-dir", " "): "--run-dir ' ' is blank",
        ("smoothness", "--run-dir", ""): "--run-dir '' is empty",
        ("magic", "--targets", "0", "--run-dir", run, "--store", ""): "--store '' is empty",
        ("clean", run, "--store", ""): "--store '' is empty",
        ("magic", "--targets", "0", "--run-dir", run, "--scores-out", ""): "--scores-out '' is empty",
        ("lds", "--run-dir", run, "--log-file", ""): "--log-file '' is empty",
        ("show-config", "--config", ""): "--config '' is empty",
    }
    for args, start in cases.items():
        line = error_line(fastreplay_in(work, *args))
        assert line == f"error: {start} (an unset or empty shell variable?); pass a real path", args
    assert tree(work) == before  # byte for byte, nothing added
    assert not run.exists()


# --- 2. --force next to data that is not a run store ----------------------------------------

def test_force_never_deletes_what_is_not_a_run_store(tmp_path):
    inside = tmp_path / "inside"  # RUN_DIR/run.zarr holds the user's own files
    inside_files = user_files(inside / "run.zarr")
    mine = tmp_path / "mine"  # --store pointed at a user's directory
    mine_files = user_files(mine)
    group = tmp_path / "group.zarr"  # another program's Zarr group
    zarr.open_group(group, mode="w-", attributes={"owner": "someone"})
    group_before = tree(group)
    procs = fastreplay_all(
        (*magic("0"), "--run-dir", inside, "--force"),
        (*magic("0"), "--run-dir", inside),
        (*magic("0"), "--run-dir", tmp_path / "a", "--store", mine, "--force"),
        (*magic("0"), "--run-dir", tmp_path / "b", "--store", group, "--force"))
    lines = [error_line(p) for p in procs]
    refused = ("refusing to delete or overwrite it (even with --force): move it away or choose "
               "another --run-dir or --store")
    assert lines[0] == lines[1] == (f"error: {inside / 'run.zarr'} is not a fastreplay run store "
                                    f"(no zarr.json); {refused}")  # not "a run store exists"
    assert lines[2] == f"error: {mine} is not a fastreplay run store (no zarr.json); {refused}"
    assert lines[3] == (f"error: {group} is not a fastreplay run store (a Zarr group without "
                        f"fastreplay's fingerprint and config); {refused}")
    assert_kept(inside / "run.zarr", inside_files)
    assert_kept(mine, mine_files)
    assert tree(group) == group_before
    # Refused before any work: no run directory was created for the --store cases.
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- 3. clean --what all ---------------------------------------------------------------------

def test_clean_all_deletes_only_what_the_run_wrote(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    outside.mkdir()
    (outside / "real.png").write_bytes(b"not fastreplay's")
    fake_run_store(run / "run.zarr")
    written = ["config.toml", "magic_summary.json", "plots/target_00003.png",
               "plots/lds_weight_keep0.9.png", ".config.toml.4242.tmp", ".write-probe-4242"]
    for rel in written:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(b"fastreplay wrote this")
    files = user_files(run)
    files["plots/mine.png"] = b"the user's own plot"
    (run / "plots" / "mine.png").write_bytes(files["plots/mine.png"])
    (run / "plots" / "lds_link.png").symlink_to(outside / "real.png")  # never followed
    (run / "elsewhere").symlink_to(outside, target_is_directory=True)

    proc = ok(fastreplay("clean", run, "--what", "all"))
    assert_kept(run, files)
    assert (outside / "real.png").read_bytes() == b"not fastreplay's"
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert left == sorted([*files, "data", "plots", "plots/lds_link.png", "elsewhere"]), left
    said = "".join(proc.stderr.split())  # the log wraps long lines anywhere
    assert f"kept{run}:itstillholds.mine.tmp,data,elsewhere,notes.txt,plots,whichfastreplay" in said

    # A run directory holding only what fastreplay wrote goes entirely.
    only = tmp_path / "only"
    fake_run_store(only / "run.zarr")
    for rel in written:
        (only / rel).parent.mkdir(parents=True, exist_ok=True)
        (only / rel).write_bytes(b"fastreplay wrote this")
    ok(fastreplay("clean", only, "--what", "all"))
    assert not only.exists()


# --- 4. --store URL schemes ------------------------------------------------------------------

def test_store_urls_file_is_local_and_other_schemes_are_refused(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    files = user_files(work)
    run = tmp_path / "run"
    allowed = "s3://, s3a://, gs://, gcs://, az://, abfs://, abfss://"
    for url in ("memory://run.zarr", "zip://run.zarr::runs.zip", "ftp://host/run.zarr"):
        scheme = url.split("://")[0]
        for command in (magic("0"), ["lds"], ["clean", run]):
            args = [*command, "--store", url] + (["--run-dir", run] if command[0] != "clean" else [])
            assert error_line(fastreplay_in(work, *args)) == (
                f"error: --store {url}: {scheme}:// is not supported (a run store needs "
                "persistent storage with atomic writes); use a local path, file:///ABS/PATH or an "
                f"object-store URL ({allowed})")
    assert error_line(fastreplay_in(work, *magic("0"), "--run-dir", run, "--store",
                                    "file://run.zarr")) == (
        "error: --store file://run.zarr is not a local absolute path; write a file:// URL as "
        "file:///ABS/PATH (three slashes) or pass the plain path")
    assert not run.exists()

    # file:///ABS is the local path ABS, for every command: not ./file:/ABS under the cwd.
    store = tmp_path / "elsewhere" / "run.zarr"
    ok(fastreplay_in(work, *magic("0"), "--run-dir", run, "--store", f"file://{store}"))
    assert RunStore.open(store, "r").status == "trained"
    assert not (work / "file:").exists() and not (run / "run.zarr").exists()
    ok(fastreplay_in(work, "clean", run, "--store", f"file://localhost{store}", "--what", "all"))
    assert not store.exists() and not run.exists()
    assert tree(work) == {**{rel: data for rel, data in files.items()}, "data": "<dir>"}


# --- 5. LDS values carry checksums -----------------------------------------------------------

def test_lds_values_are_checksummed(scored, tmp_path):
    # A value changed behind fastreplay's back is refused, not used; nothing is deleted.
    changed = copy_of(scored, tmp_path, "changed")
    store = RunStore.open(changed / "run.zarr")
    store._group[f"{GROUP}/values"][1] = scored["values"][1] + 0.125
    store.close()
    before = tree(changed / "run.zarr")
    # A row written but whose checksum never was (SIGKILL in between) is trained again.
    killed = copy_of(scored, tmp_path, "killed")
    shutil.rmtree(killed / "run.zarr" / "lds")
    crash = fastreplay(*LDS, "--run-dir", killed, crash="lds_partial:2")
    assert crash.returncode == KILLED, crash.stderr[-3000:]
    refused, resumed = fastreplay_all((*LDS, "--run-dir", changed), (*LDS, "--run-dir", killed))
    assert error_line(refused) == (
        f"error: {GROUP} of {changed / 'run.zarr'}: the values of model 1 are corrupted "
        f"(checksum mismatch); delete the LDS results with `fastreplay clean {changed} --what "
        "lds` and rerun `fastreplay lds`")
    assert tree(changed / "run.zarr") == before
    want = dict(scored["lds"])
    want.pop("seconds")
    assert lds_json(resumed) == want
    store = RunStore.open(killed / "run.zarr", "r")
    assert np.array_equal(store._group[f"{GROUP}/values"][...], scored["values"])  # bitwise
    store.close()
    # The documented fix deletes the LDS results (the next `lds` measures afresh, as `killed` did).
    ok(fastreplay("clean", changed, "--what", "lds"))
    assert not (changed / "run.zarr" / "lds").exists() and (changed / "run.zarr" / "scores").is_dir()

    # Stores written before LDS checksums (no checksum array) are read without the check.
    old = copy_of(scored, tmp_path, "old")
    shutil.rmtree(old / "run.zarr" / GROUP / "checksum")
    store = RunStore.open(old / "run.zarr")
    masks = np.unpackbits(store._group[f"{GROUP}/masks"][...], axis=1)[:, :96].astype(bool)
    values = store.lds_values(GROUP, masks, [0, 1], {})
    store.close()
    assert np.array_equal(values, scored["values"])


# --- 6. a damaged root zarr.json -------------------------------------------------------------

def test_damaged_store_metadata_says_corrupted(scored, tmp_path):
    run = copy_of(scored, tmp_path)
    root = run / "run.zarr" / "zarr.json"
    root.write_bytes(root.read_bytes()[:100])  # truncated
    before = tree(run)
    garbage = tmp_path / "garbage"  # someone's directory with an unreadable zarr.json
    files = {**user_files(garbage / "run.zarr"), "zarr.json": b"{not json"}
    (garbage / "run.zarr" / "zarr.json").write_bytes(files["zarr.json"])
    procs = fastreplay_all((*magic(), "--run-dir", run), (*LDS, "--run-dir", run),
                           ("clean", run, "--what", "checkpoints"),
                           (*magic(), "--run-dir", garbage, "--force"))
    store = run / "run.zarr"
    want = (f"error: {store} is corrupted (its zarr.json is unreadable: not valid JSON); pass "
            "--force to discard it and train again (its layout shows it is a fastreplay run "
            "store), or choose another --run-dir or --store")
    assert [error_line(p) for p in procs[:3]] == [want] * 3
    assert error_line(procs[3]) == (
        f"error: {garbage / 'run.zarr'} is corrupted (its zarr.json is unreadable: not valid "
        "JSON) and has no fastreplay layout (schedule/, checkpoints/, final/); refusing to delete "
        "or overwrite it (even with --force): move it away or choose another --run-dir or --store")
    assert tree(run) == before
    assert_kept(garbage / "run.zarr", files)
    # Recognisably ours: --force (and `clean --what all`) may discard it.
    spare = copy_of(scored, tmp_path, "spare")
    (spare / "run.zarr" / "zarr.json").write_bytes(b"")
    assert discard_store(spare / "run.zarr") and not (spare / "run.zarr").exists()
    ok(fastreplay("clean", run, "--what", "all"))
    assert not run.exists()


# --- 7. a damaged score array ----------------------------------------------------------------

def test_damaged_score_metadata_is_one_line(scored, tmp_path):
    run = copy_of(scored, tmp_path)
    meta = run / "run.zarr" / "scores" / "loss" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:100])
    before = tree(run / "run.zarr")
    lines = [error_line(fastreplay(*args, "--run-dir", run)) for args in (magic(), LDS)]
    assert lines == [f"error: scores/loss of {run / 'run.zarr'} is corrupted (its zarr.json is "
                     "unreadable: JSONDecodeError); delete the stored scores with `fastreplay "
                     f"clean {run} --what scores` and rerun `fastreplay magic` to recompute them "
                     "(training is reused)"] * 2
    assert tree(run / "run.zarr") == before
    ok(fastreplay("clean", run, "--what", "scores"))
    out = json.loads(ok(fastreplay(*magic("1"), "--run-dir", run, "--json", "--scores-out",
                                   tmp_path / "again.npy")).stdout.strip().splitlines()[-1])
    assert out["replayed_targets"] == 1
    assert np.array_equal(np.load(tmp_path / "again.npy"), scored["scores"][1:])  # bitwise
