"""Run stores at fsspec URLs: `--store s3://bucket/run.zarr`, against a local S3 server (moto's,
started on loopback for this session). A run stored there reads back identically to the same run
stored locally, and is reused, extended, validated (LDS), replaced (--force) and cleaned the
same way."""
from __future__ import annotations

import importlib
import logging
import socket
import sys

import numpy as np
import pytest
from conftest import SMALL, run_module, set_args

from fastreplay.exceptions import StoreError
from fastreplay.interface.api import store_path
from fastreplay.store import RunStore

pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[test]')")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed "
                                  "(pip install -e '.[test]')")

BUCKET = "fastreplay-test"
MAGIC = ["magic", "--preset", "test", *set_args(SMALL), "--no-plots", "--log-level", "WARNING"]


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on 127.0.0.1 (free port) with one bucket; the AWS_* environment points
    s3fs (through botocore) at it with fake credentials. Yields an s3fs filesystem."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no per-request log lines
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE",
                     "AWS_SHARED_CREDENTIALS_FILE"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        import s3fs
        fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
        fs.mkdir(BUCKET)
        try:
            yield fs
        finally:
            server.stop()


def url(key: str) -> str:
    return f"s3://{BUCKET}/{key}"


@pytest.fixture(scope="module")
def twin_runs(s3, tmp_path_factory, cli):
    """The same tiny float64 run scored for targets 0,1 twice: stored locally and in S3."""
    root = tmp_path_factory.mktemp("s3")
    local, remote = root / "local", root / "remote"
    store = url("twin/run.zarr")
    out_local = cli.json(*MAGIC, "--targets", "0,1", "--run-dir", local,
                         "--scores-out", root / "local.npy")
    out_remote = cli.json(*MAGIC, "--targets", "0,1", "--run-dir", remote, "--store", store,
                          "--scores-out", root / "remote.npy")
    return {"root": root, "local": local, "remote": remote, "store": store,
            "out_local": out_local, "out_remote": out_remote}


@pytest.fixture(scope="module")
def cli():  # module scope (conftest's is per test)
    from conftest import Cli
    return Cli()


def test_magic_on_s3_reads_back_identically(twin_runs, s3):
    r = twin_runs
    assert r["out_remote"]["store"] == r["store"] and r["out_local"]["store"] == str(store_path(r["local"]))
    assert r["out_remote"]["replayed_targets"] == 2
    a, b = np.load(r["root"] / "local.npy"), np.load(r["root"] / "remote.npy")
    assert a.dtype == np.float64 and a.shape == (2, 48)
    assert a.tobytes() == b.tobytes()  # bitwise
    # The run directory stays local and holds no store; the group lives in the bucket.
    assert not store_path(r["remote"]).exists()
    assert (r["remote"] / "config.toml").is_file() and (r["remote"] / "magic_summary.json").is_file()
    assert s3.exists(f"{BUCKET}/twin/run.zarr/zarr.json")

    lo, rs = RunStore.open(store_path(r["local"]), mode="r"), RunStore.open(r["store"], mode="r")
    assert RunStore.exists(r["store"]) and not RunStore.exists(url("twin/missing.zarr"))
    assert rs.config == lo.config and rs.fingerprint == lo.fingerprint
    assert rs.status == lo.status == "trained"
    assert rs.get_attr("versions") == lo.get_attr("versions")
    for x, y in zip(lo.read_schedule(), rs.read_schedule()):
        assert np.array_equal(x, y) and x.dtype == y.dtype
    steps = lo.checkpoint_steps()
    assert np.array_equal(steps, rs.checkpoint_steps()) and (steps >= 0).all()
    for slot in range(len(steps)):
        x, y = lo.read_checkpoint(slot), rs.read_checkpoint(slot)
        assert x[0] == y[0] and all(np.array_equal(u, v) for u, v in zip(x[1:], y[1:], strict=True))
    for u, v in zip(lo.read_final(), rs.read_final(), strict=True):
        assert np.array_equal(u, v)
    assert lo.score_names() == rs.score_names() == ["loss"]
    (xs, xa), (ys, ya) = lo.read_scores("loss"), rs.read_scores("loss")
    assert np.array_equal(xs, ys) and xa == ya
    # The objects under the store's prefix, and about what the same store takes locally (the
    # attrs differ by a few bytes: store location, timestamps).
    listed = sum(s3.size(f) for f in s3.find(r["store"]))
    assert rs.nbytes_on_disk() == listed and abs(listed - lo.nbytes_on_disk()) < 0.01 * listed
    lo.close(), rs.close()


def test_second_magic_reuses_the_s3_run_and_adds_targets(twin_runs, cli, monkeypatch):
    r = twin_runs
    import fastreplay.interface.api as api
    monkeypatch.setattr(api, "train_into_store", lambda *a, **k: pytest.fail("retrained"))
    out = cli.json(*MAGIC, "--targets", "0,1,2", "--run-dir", r["remote"], "--store", r["store"],
                   "--scores-out", r["root"] / "remote3.npy")
    assert out["replayed_targets"] == 1 and out["train_seconds"] == r["out_remote"]["train_seconds"]
    cli.json(*MAGIC, "--targets", "0,1,2", "--run-dir", r["local"],
             "--scores-out", r["root"] / "local3.npy")
    a, b = np.load(r["root"] / "local3.npy"), np.load(r["root"] / "remote3.npy")
    assert a.shape == (3, 48) and a.tobytes() == b.tobytes()
    scores, attrs = RunStore.open(r["store"], mode="r").read_scores("loss")
    assert attrs["targets"] == [0, 1, 2] and scores.tobytes() == a.tobytes()


def test_lds_on_s3_matches_local(twin_runs, cli):
    r = twin_runs
    lds = ["lds", "--models", "4", "--keep", "0.9", "--targets", "0,1", "--models-per-batch", "2",
           "--no-plots", "--log-level", "WARNING"]
    local = cli.json(*lds, "--run-dir", r["local"])
    remote = cli.json(*lds, "--run-dir", r["remote"], "--store", r["store"])
    assert remote.pop("seconds") > 0 and local.pop("seconds") > 0
    assert remote == local  # the LDS values and their statistics, exactly
    group = "lds/weight_keep0.9"
    lo, rs = RunStore.open(store_path(r["local"]), mode="r"), RunStore.open(r["store"], mode="r")
    assert rs.lds_groups() == lo.lds_groups() == [group]
    values = lo._group[f"{group}/values"][...]
    assert np.isfinite(values).all() and np.array_equal(values, rs._group[f"{group}/values"][...])
    # smoothness opens the S3 run the same way (read-only use of the store).
    out = cli.json("smoothness", "--run-dir", r["remote"], "--store", r["store"],
                   "--log-level", "WARNING")
    assert out["deterministic"] is True  # retraining from the S3 run lands on it bit for bit


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once closed


def test_unreachable_endpoint_and_missing_bucket_are_one_line_errors(s3, tmp_path):
    bad = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{_closed_port()}", "AWS_MAX_ATTEMPTS": "1"}
    proc = run_module(*MAGIC, "--targets", "0", "--run-dir", tmp_path / "a",
                      "--store", url("x/run.zarr"), "--force", env=bad, check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: cannot reach the store s3://")
    assert "AWS_ENDPOINT_URL" in err

    proc = run_module(*MAGIC, "--targets", "0", "--run-dir", tmp_path / "b",
                      "--store", "s3://no-such-bucket/run.zarr", check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1, err
    assert "bucket 'no-such-bucket' of s3://no-such-bucket/run.zarr does not exist" in err
    assert not s3.exists("no-such-bucket")  # nothing created on the way


def test_missing_s3fs_and_bucket_only_urls_are_clear(s3, tmp_path, monkeypatch):
    from fastreplay.interface.api import open_trained
    with pytest.raises(StoreError, match=r"names a bucket, not a location inside it; use e\.g\. "
                                         rf"s3://{BUCKET}/run\.zarr"):
        open_trained(tmp_path, store_url=f"s3://{BUCKET}")
    # No s3fs: fsspec cannot load the s3 protocol.
    monkeypatch.delitem(importlib.import_module("fsspec.registry")._registry, "s3", raising=False)
    monkeypatch.setitem(sys.modules, "s3fs", None)
    with pytest.raises(StoreError, match=r"cannot open s3://.*s3fs.*pip install s3fs") as exc:
        open_trained(tmp_path, store_url=url("twin/run.zarr"))
    assert "\n" not in str(exc.value)


def test_force_replaces_only_that_group_and_clean(s3, tmp_path, cli):
    prefix = f"{BUCKET}/force"
    neighbours = {f"{prefix}/run.zarr2/keep.bin": b"a", f"{prefix}/run.zarr-notes.txt": b"b",
                  f"{prefix}/other.zarr/zarr.json": b"{}", f"{prefix}/data/x.bin": b"c"}
    for key, data in neighbours.items():
        s3.pipe_file(key, data)
    run_dir, store = tmp_path / "run", url("force/run.zarr")
    first = cli.json(*MAGIC, "--targets", "0", "--run-dir", run_dir, "--store", store)
    s3.pipe_file(f"{prefix}/run.zarr/stray.bin", b"left from before")
    again = cli.json(*MAGIC, "--targets", "0", "--run-dir", run_dir, "--store", store, "--force")
    assert again["replayed_targets"] == 1 and first["replayed_targets"] == 1
    assert not s3.exists(f"{prefix}/run.zarr/stray.bin")  # the old group went entirely
    assert all(s3.cat_file(k) == v for k, v in neighbours.items())
    assert RunStore.open(store, mode="r").status == "trained"

    # --force never deletes what is not a fastreplay store.
    for target in ("data", "other.zarr"):
        with pytest.raises(StoreError, match="refusing to delete"):
            cli(*MAGIC, "--targets", "0", "--run-dir", tmp_path / target,
                "--store", url(f"force/{target}"), "--force")
    assert all(s3.cat_file(k) == v for k, v in neighbours.items())

    # clean works on the remote store too; --what all removes it and the run directory.
    before = RunStore.open(store, mode="r").nbytes_on_disk()
    cli("clean", run_dir, "--store", store, "--what", "checkpoints")
    after = RunStore.open(store, mode="r")
    assert after.nbytes_on_disk() < before and after.status == "cleaned"
    assert after.read_scores("loss")[0].shape == (1, 48)
    cli("clean", run_dir, "--store", store, "--what", "all")
    assert not s3.exists(f"{prefix}/run.zarr") and not run_dir.exists()
    assert all(s3.cat_file(k) == v for k, v in neighbours.items())
    assert sorted(s3.find(prefix)) == sorted(neighbours)  # no write probe left behind either
