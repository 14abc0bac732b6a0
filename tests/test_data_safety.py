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


# --- 3. what fastreplay wrote is decided by content (the manifest), not by name ----------------

# Names fastreplay writes under, as a user's own files: they must never be overwritten or deleted.
LOOKALIKES = {"config.toml": b"my own config\n", "magic_summary.json": b'{"mine": 1}',
              "plots/target_final.png": b"my plot", "plots/lds_notes.png": b"my notes plot",
              "debug/harm_report.csv": b"my report"}


def write_files(root: Path, files: dict) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def test_a_directory_of_someone_elses_files_is_refused_before_anything_is_written(tmp_path):
    """magic and train start a run only in a new, empty or fastreplay-made directory: in any
    other, fastreplay could not tell the user's config.toml from its own."""
    run = tmp_path / "run"
    write_files(run, {**LOOKALIKES, "notes.txt": b"mine"})
    before = tree(run)
    procs = fastreplay_all((*magic("0"), "--run-dir", run), ("train", *CONFIG, "--run-dir", run,
                                                             "--log-level", "WARNING"))
    for proc in procs:
        assert error_line(proc) == (
            f"error: --run-dir {run} is not empty (config.toml, debug, magic_summary.json, "
            "notes.txt, plots) and has no fastreplay manifest (.fastreplay-manifest.json), so "
            "fastreplay cannot tell your files from its own; use a new or empty --run-dir (a run "
            f"stored there by an older fastreplay can be reused with --store {run / 'run.zarr'})")
    assert tree(run) == before  # not even a .lock


def test_files_fastreplay_did_not_write_are_never_overwritten_or_deleted(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    ok(fastreplay(*magic("0"), "--run-dir", run, "--plots"))
    ok(fastreplay(*LDS, "--run-dir", run, "--plots"))
    assert {"config.toml", "magic_summary.json", "plots", ".lock", ".fastreplay-manifest.json",
            "run.zarr"} == {p.name for p in run.iterdir()}
    ours = ["plots/target_00000.png", "plots/lds_weight_keep0.9.png", ".lock",
            ".fastreplay-manifest.json"]
    # The user edits fastreplay's config.toml, replaces its summary with a file of their own and
    # adds files under names fastreplay writes.
    mine = {**LOOKALIKES, "config.toml": b"edited by hand\n", "notes.txt": b"mine"}
    write_files(run, mine)
    outside.mkdir()
    (outside / "photo.png").write_bytes(b"a photo")
    (run / "plots" / "lds_link.png").symlink_to(outside / "photo.png")

    # An edited config.toml is not overwritten: the rerun is refused, before any work.
    assert error_line(fastreplay(*magic("0"), "--run-dir", run)) == (
        f"error: {run / 'config.toml'} exists and fastreplay wrote it, but it was changed since; "
        "refusing to overwrite it: move it away or use another --run-dir")
    assert_kept(run, mine)

    proc = ok(fastreplay("clean", run, "--what", "all"))
    assert_kept(run, mine)
    assert (outside / "photo.png").read_bytes() == b"a photo"
    for rel in ours:
        assert not (run / rel).exists(), rel
    left = sorted(str(p.relative_to(run)) for p in run.rglob("*"))
    assert left == sorted([*mine, "debug", "plots", "plots/lds_link.png"]), left
    said = "".join(proc.stderr.split())  # the log wraps long lines anywhere
    assert f"keptconfig.toml,magic_summary.jsonin{run}:fastreplaywrotethem,buttheywerechangedsince" in said
    assert (f"kept{run}:itstillholdsconfig.toml,debug,magic_summary.json,notes.txt,plots(not"
            "writtenbyfastreplay,orchangedsince)") in said

    # A run directory holding only what fastreplay wrote goes entirely.
    only = tmp_path / "only"
    ok(fastreplay(*magic("0"), "--run-dir", only, "--plots"))
    ok(fastreplay("clean", only, "--what", "all"))
    assert not only.exists()


def test_a_run_directory_writes_only_over_its_own_unchanged_files(tmp_path):
    """RunDir.write itself (not only the commands' checks before any work) refuses a file the
    manifest does not list, or whose content changed since; the manifest survives a reopen."""
    from fastreplay.exceptions import StoreError
    from fastreplay.store.rundir import claim
    run = tmp_path / "run"
    rd = claim(run, str(run / "run.zarr"), new_run=True)
    try:
        rd.write("a/ours.txt", b"1")
        rd.write("a/ours.txt", b"2")  # ours and unchanged: replaced
        (run / "a" / "ours.txt").write_bytes(b"edited")
        (run / "theirs.txt").write_bytes(b"user")
        with pytest.raises(StoreError, match="fastreplay wrote it, but it was changed since"):
            rd.write("a/ours.txt", b"3")
        with pytest.raises(StoreError, match="exists and fastreplay did not write it"):
            rd.write("theirs.txt", b"3")
    finally:
        rd.release()
    assert (run / "a" / "ours.txt").read_bytes() == b"edited"
    assert (run / "theirs.txt").read_bytes() == b"user"
    rd = claim(run, str(run / "run.zarr"))
    try:
        (run / "a" / "ours.txt").write_bytes(b"2")  # back to what fastreplay wrote: ours again
        assert rd.ours("a/ours.txt") and not rd.ours("theirs.txt")
        assert [p.name for p in run.glob("**/*.tmp")] == []  # no temporary left behind
    finally:
        rd.release()


def empty_manifest(run: Path) -> None:
    """A run directory fastreplay made but wrote nothing in yet (its manifest lists nothing)."""
    (run / ".fastreplay-manifest.json").write_text(
        '{"format": 1, "files": {}, "dirs": [], "temps": []}')


def test_nothing_is_written_through_a_symbolic_link(tmp_path):
    """Neither .lock nor plots/ (nor a plot) is followed: a user file behind the link stays."""
    photos = tmp_path / "photos"
    photos.mkdir()
    photo = photos / "target_00000.png"
    photo.write_bytes(b"a user's photo")
    (photos / "pid.txt").write_bytes(b"important")
    lock_link, plots_link, plot_link = (tmp_path / n for n in ("lock", "plots", "plot"))
    for run in (lock_link, plots_link, plot_link):
        run.mkdir()
        empty_manifest(run)
    (lock_link / ".lock").symlink_to(photos / "pid.txt")
    (plots_link / "plots").symlink_to(photos, target_is_directory=True)
    (plot_link / "plots").mkdir()
    (plot_link / "plots" / "target_00000.png").symlink_to(photo)
    procs = fastreplay_all(*((*magic("0"), "--run-dir", run, "--plots")
                             for run in (lock_link, plots_link, plot_link)))
    assert [error_line(p) for p in procs] == [
        f"error: {lock_link / '.lock'} is a symbolic link; fastreplay never writes through one: "
        "remove the link (fastreplay makes its own lock file there)",
        f"error: {plots_link / 'plots'} is a symbolic link; fastreplay writes its outputs there "
        "and never through a link: move it away or use another --run-dir",
        f"error: {plot_link / 'plots' / 'target_00000.png'} is a symbolic link; fastreplay never "
        "writes through one: move it away or pass --no-plots"]
    assert photo.read_bytes() == b"a user's photo"
    assert (photos / "pid.txt").read_bytes() == b"important"
    assert sorted(p.name for p in photos.iterdir()) == ["pid.txt", "target_00000.png"]
    # a regular .lock holding someone's data is not fastreplay's either
    other = tmp_path / "other"
    other.mkdir()
    empty_manifest(other)
    (other / ".lock").write_bytes(b"my lock notes")
    assert error_line(fastreplay(*magic("0"), "--run-dir", other)) == (
        f"error: {other / '.lock'} is not a fastreplay lock file (it holds other data); move it "
        "away: fastreplay keeps its lock under that name")
    assert (other / ".lock").read_bytes() == b"my lock notes"


def test_a_store_is_locked_for_every_run_directory_that_names_it(scored, tmp_path):
    """A second command cannot discard (--force) or use a store another command is working in,
    whichever run directory it comes from."""
    from fastreplay.store import StoreLock
    run = copy_of(scored, tmp_path)
    store = run / "run.zarr"
    before = tree(store)
    (tmp_path / "c").mkdir()  # lds works in an existing run directory
    holder = StoreLock(str(store))  # this test process plays the running command
    try:
        procs = fastreplay_all(
            (*magic("0"), "--run-dir", tmp_path / "b", "--store", store, "--force"),
            (*LDS, "--run-dir", tmp_path / "c", "--store", tmp_path / "run" / ".." / "run" / "run.zarr"),
            ("clean", tmp_path / "d", "--store", store, "--what", "all"))
        for proc, shown in zip(procs, (store, tmp_path / "run" / ".." / "run" / "run.zarr", store)):
            assert error_line(proc) == (
                f"error: the run store {shown} is in use by another fastreplay process (pid "
                f"{os.getpid()}); wait for it or use another --store / --run-dir")
    finally:
        holder.release()
    assert tree(store) == before
    assert not (tmp_path / "b").exists() and not (tmp_path / "d").exists()  # none left behind
    assert list((tmp_path / "c").iterdir()) == []  # not even a .lock
    ok(fastreplay(*LDS, "--run-dir", tmp_path / "c", "--store", store))  # released: usable


def test_a_hand_edited_stored_config_is_refused(scored, tmp_path):
    """The config in zarr.json is checked on every open: lds must not retrain with an edited lr
    (it reported LDS 0.600 instead of 1.000, in silence)."""
    def edit(run: Path, drop_digest: bool = False) -> None:
        meta_path = run / "run.zarr" / "zarr.json"
        meta = json.loads(meta_path.read_text())
        meta["attributes"]["config"]["train"]["lr"] *= 2
        if drop_digest:  # a store made before the identity digest: the fingerprint catches it
            meta["attributes"].pop("identity_digest")
        meta_path.write_text(json.dumps(meta))

    edited, old = copy_of(scored, tmp_path, "edited"), copy_of(scored, tmp_path, "old")
    edit(edited)
    edit(old, drop_digest=True)
    before = tree(edited / "run.zarr")
    procs = fastreplay_all((*LDS, "--run-dir", edited), (*LDS, "--run-dir", old),
                           (*magic("0"), "--run-dir", edited))
    fix = ("restore the store's zarr.json from a copy, or rerun `fastreplay magic` with --force "
           "(or another --run-dir) to train again")
    identity = (f"error: the identity of {edited / 'run.zarr'} (its stored config, fingerprint or "
                f"input fingerprints) was edited or corrupted since the run was made; {fix}")
    lines = [error_line(p) for p in procs]
    assert lines[0] == lines[2] == identity
    assert lines[1].startswith(f"error: the config stored in {old / 'run.zarr'} was edited or "
                               "corrupted: it no longer matches the run's fingerprint (")
    assert lines[1].endswith(fix)
    assert tree(edited / "run.zarr") == before


# --- 4. --store URL schemes ------------------------------------------------------------------

def test_store_urls_file_is_local_and_other_schemes_are_refused(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    files = user_files(work)
    run = tmp_path / "run"
    allowed = "s3://, s3a://, gs://, gcs://, az://, abfs://, abfss://"
    def refusals(url: str) -> set[str]:
        """The error lines of magic, lds and clean given ``url`` as --store."""
        lines = set()
        for command in (magic("0"), ["lds"], ["clean", run]):
            args = [*command, "--store", url] + (["--run-dir", run] if command[0] != "clean" else [])
            lines.add(error_line(fastreplay_in(work, *args)))
        return lines

    for url in ("memory://run.zarr", "zip://run.zarr::runs.zip", "ftp://host/run.zarr"):
        scheme = url.split("://")[0]
        assert refusals(url) == {
            f"error: --store {url}: {scheme}:// is not supported (a run store needs "
            "persistent storage with atomic writes); use a local path, file:///ABS/PATH or an "
            f"object-store URL ({allowed})"}
    # One slash after the scheme (a typo): not a local ./s3:/bucket/run.zarr under the cwd.
    for url in ("s3:/bucket/run.zarr", "s3:bucket/run.zarr", "gs:/bucket/run.zarr"):
        scheme = url.split(":")[0]
        assert refusals(url) == {
            f"error: --store {url} is a URL with a malformed authority ('{scheme}:' must be "
            f"followed by '//'); write {scheme}://BUCKET/PATH (or ./{url} for a local "
            "directory of that name)"}
    assert error_line(fastreplay_in(work, *magic("0"), "--run-dir", run, "--store",
                                    "s3:///run.zarr")) == (
        "error: --store s3:///run.zarr names no bucket (nothing between 's3://' and the next "
        "'/'); write s3://BUCKET/PATH")
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
