import threading

import numpy as np
import pytest
import torch

from fastreplay.exceptions import StoreError
from fastreplay.store import AsyncWriter, Prefetcher, RunStore, versions

CONFIG = {"model": "mlp", "lr": 0.1, "layers": [4, 8], "nested": {"a": True}}
T, B, G, K, P, Q = 300, 5, 2, 4, 37, 3


def make_store(tmp_path, dtype="float32", q=Q):
    store = RunStore.create(tmp_path / "run.zarr", CONFIG, "fp123", versions())
    store.allocate(num_steps=T, batch_size=B, num_groups=G, num_checkpoints=K,
                   num_params=P, num_buffers=q, dtype=dtype)
    return store


def rand(rng, n, dtype):
    x = rng.standard_normal(n).astype(dtype) + np.asarray(3, dtype)  # never all zeros
    assert np.all(x != 0)
    return x


def test_create_open_roundtrip_attrs(tmp_path):
    store = make_store(tmp_path)
    store.status = "training"
    store.set_attr("test_accuracy", np.float32(0.5))  # numpy scalars are not JSON by themselves
    store.set_attr("shape", torch.tensor([2, 3]))
    assert store.get_attr("missing", "dflt") == "dflt"
    with pytest.raises(StoreError, match="JSON"):
        store.set_attr("bad", object())
    store.close()
    assert RunStore.exists(tmp_path / "run.zarr")
    again = RunStore.open(tmp_path / "run.zarr", mode="r")
    assert again.config == CONFIG
    assert again.fingerprint == "fp123"
    assert again.status == "training"
    assert again.get_attr("test_accuracy") == 0.5 and again.get_attr("shape") == [2, 3]
    assert set(again._group.attrs["versions"]) == {"fastreplay", "torch", "zarr", "numpy", "python"}
    assert again._group.attrs["updated"] >= again._group.attrs["created"]
    again.close()


def test_create_existing_raises(tmp_path):
    make_store(tmp_path).close()
    with pytest.raises(StoreError, match="--force"):
        RunStore.create(tmp_path / "run.zarr", CONFIG, "fp", {})


def test_open_missing_raises(tmp_path):
    assert not RunStore.exists(tmp_path / "nope.zarr")
    with pytest.raises(StoreError, match="no run store"):
        RunStore.open(tmp_path / "nope.zarr")


def test_open_foreign_group_raises(tmp_path):
    import zarr
    zarr.open_group(tmp_path / "other.zarr", mode="w-")
    assert not RunStore.exists(tmp_path / "other.zarr")
    with pytest.raises(StoreError, match="not a fastreplay"):
        RunStore.open(tmp_path / "other.zarr")


def test_schedule_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    store = make_store(tmp_path)
    idx = rng.integers(0, 10_000, size=(T, B)).astype(np.int64)
    lr = rng.random((T, G))
    store.write_schedule(idx, lr)
    got_idx, got_lr = RunStore.open(tmp_path / "run.zarr", "r").read_schedule()
    assert got_idx.dtype == np.int32 and np.array_equal(got_idx, idx)
    assert got_lr.dtype == np.float64 and np.array_equal(got_lr, lr)


def test_allocate_idempotent_and_rejects_other_shape(tmp_path):
    store = make_store(tmp_path)
    lr = np.full((T, G), 0.5)
    store.write_schedule(np.ones((T, B), np.int32), lr)
    store.allocate(num_steps=T, batch_size=B, num_groups=G, num_checkpoints=K,
                   num_params=P, num_buffers=Q, dtype="float32")
    assert np.array_equal(store.read_schedule()[1], lr)  # not wiped
    with pytest.raises(StoreError, match="another config"):
        store.allocate(num_steps=T, batch_size=B, num_groups=G, num_checkpoints=K,
                       num_params=P + 1, num_buffers=Q, dtype="float32")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_checkpoints_bitwise_roundtrip(tmp_path, dtype):
    rng = np.random.default_rng(1)
    store = make_store(tmp_path, dtype)
    written = {}
    for slot in range(K):
        p, m, b = rand(rng, P, dtype), rand(rng, P, dtype), rand(rng, Q, dtype)
        # Slot 1 goes in as torch tensors, the rest as numpy arrays.
        args = [torch.from_numpy(x.copy()) for x in (p, m, b)] if slot == 1 else [p, m, b]
        store.write_checkpoint(slot, 10 * slot + 3, *args)
        written[slot] = (10 * slot + 3, p, m, b)
    fp, fb = rand(rng, P, dtype), rand(rng, Q, dtype)
    store.write_final(torch.from_numpy(fp.copy()), fb)
    store.flush()
    reopened = RunStore.open(tmp_path / "run.zarr", "r")
    assert reopened.checkpoint_steps().tolist() == [3, 13, 23, 33]
    for slot, (step, *arrays) in written.items():
        got_step, *got = reopened.read_checkpoint(slot)
        assert got_step == step
        for want, have in zip(arrays, got):
            assert have.dtype == np.dtype(dtype)
            assert want.tobytes() == have.tobytes()
    got_fp, got_fb = reopened.read_final()
    assert got_fp.tobytes() == fp.tobytes() and got_fb.tobytes() == fb.tobytes()
    store.close()


def test_checkpoint_is_snapshotted_at_submit(tmp_path):
    rng = np.random.default_rng(2)
    store = make_store(tmp_path)
    gate, release = threading.Event(), threading.Event()
    store._writer.submit(lambda: (gate.set(), release.wait()))  # hold the writer busy
    gate.wait(5)
    p = torch.from_numpy(rand(rng, P, "float32"))
    want = p.numpy().copy()
    store.write_checkpoint(0, 7, p, p, torch.ones(Q))
    p.mul_(2)  # training mutates params in place before the write happens
    release.set()
    store.flush()
    assert store.read_checkpoint(0)[1].tobytes() == want.tobytes()


def test_lossy_dtype_rejected(tmp_path):
    store = make_store(tmp_path, "float32")
    ones = np.ones(P, np.float32)
    store.write_checkpoint(0, 5, ones, ones, np.ones(Q, np.float32))
    store.flush()
    # Buffers fail after params/momentum were written: the old commit must be gone, no new one made.
    store.write_checkpoint(0, 9, ones, ones, np.ones(Q, np.float64))
    with pytest.raises(StoreError, match="float64"):
        store.flush()
    assert store.checkpoint_steps()[0] == -1


def test_uncommitted_slot_raises(tmp_path):
    rng = np.random.default_rng(3)
    store = make_store(tmp_path, q=0)
    store.write_checkpoint(0, 0, rand(rng, P, "float32"), rand(rng, P, "float32"), np.zeros(0, np.float32))
    store.flush()
    assert store.read_checkpoint(0)[3].shape == (0,)
    # Simulate a crash mid-write: rows present, commit marker missing.
    store._group["checkpoints/params"][2] = rand(rng, P, "float32")
    store._group["checkpoints/step"][2] = 99
    assert store.checkpoint_steps().tolist() == [0, -1, -1, -1]
    with pytest.raises(StoreError, match="never fully written"):
        store.read_checkpoint(2)
    with pytest.raises(StoreError):
        store.read_checkpoint(1)


def test_writer_job_error_surfaces_and_skips_later_jobs():
    ran = []
    writer = AsyncWriter()

    def boom():
        raise OSError("disk full")

    writer.submit(boom)
    writer.submit(ran.append, 1)
    with pytest.raises(StoreError, match="disk full") as info:
        writer.flush()
    assert isinstance(info.value.__cause__, OSError)
    assert ran == []
    with pytest.raises(StoreError):
        writer.submit(ran.append, 2)
    with pytest.raises(StoreError):
        writer.close()
    writer.close()  # idempotent


def test_writer_converts_tensors_on_writer_thread():
    seen = []
    with AsyncWriter() as writer:
        writer.submit(lambda x, y=None: seen.append((type(x), type(y), threading.current_thread().name)),
                      torch.arange(3), y=torch.ones(2))
    assert seen == [(np.ndarray, np.ndarray, "fastreplay-writer")]


def test_writer_bounded_queue_blocks_submit():
    started, release, submitted = threading.Event(), threading.Event(), threading.Event()
    writer = AsyncWriter(maxsize=1)
    writer.submit(lambda: (started.set(), release.wait()))  # occupies the thread
    assert started.wait(5)
    writer.submit(lambda: None)  # fills the queue (maxsize 1)

    def third():
        writer.submit(lambda: None)
        submitted.set()

    t = threading.Thread(target=third)
    t.start()
    assert not submitted.wait(0.3), "submit returned although the queue was full"
    release.set()
    assert submitted.wait(5)
    t.join()
    writer.close()


def test_prefetcher_order_and_data(tmp_path):
    rng = np.random.default_rng(4)
    store = make_store(tmp_path, "float64")
    params = {}
    for slot in range(K):
        params[slot] = rand(rng, P, "float64")
        store.write_checkpoint(slot, slot * 5, params[slot], rand(rng, P, "float64"), rand(rng, Q, "float64"))
    store.flush()
    order = [3, 1, 2, 0]
    got = list(Prefetcher(store, order, depth=2))
    assert [s for s, _ in got] == order
    for slot, (step, p, _, _) in got:
        assert step == slot * 5 and p.tobytes() == params[slot].tobytes()
    # Breaking out early must not hang.
    for slot, _ in Prefetcher(store, order, depth=1):
        break


def test_prefetcher_bounds_read_ahead(tmp_path):
    store = make_store(tmp_path, "float64")
    reads, original = [], store.read_checkpoint
    store.read_checkpoint = lambda s: (reads.append(s), original(s))[1]
    for slot in range(K):
        store.write_checkpoint(slot, slot, np.ones(P), np.ones(P), np.ones(Q))
    store.flush()
    it = iter(Prefetcher(store, list(range(K)), depth=2))
    next(it)
    for _ in range(50):  # give the reader time to (wrongly) run ahead
        threading.Event().wait(0.005)
    assert len(reads) <= 3  # one yielded + at most depth ahead
    it.close()


def test_prefetcher_propagates_errors(tmp_path):
    store = make_store(tmp_path)
    store.write_checkpoint(0, 0, np.ones(P, np.float32), np.ones(P, np.float32), np.ones(Q, np.float32))
    store.flush()
    it = iter(Prefetcher(store, [0, 1]))
    assert next(it)[0] == 0
    with pytest.raises(StoreError, match="slot 1"):
        next(it)


def test_scores_roundtrip(tmp_path):
    rng = np.random.default_rng(5)
    store = make_store(tmp_path)
    assert store.score_names() == []
    scores = rng.standard_normal((20, 50))
    store.write_scores("test_loss", scores, list(range(100, 120)), "loss", {"note": "x", "start": np.int64(4)})
    store.write_scores("margin", scores[:3], [1, 2, 3], "margin")
    got, attrs = RunStore.open(tmp_path / "run.zarr", "r").read_scores("test_loss")
    assert got.tobytes() == scores.tobytes()
    assert attrs == {"targets": list(range(100, 120)), "kind": "loss", "note": "x", "start": 4}
    store.write_scores("test_loss", scores[:2] + 1, [7, 8], "loss")  # overwrite with a new shape
    got, attrs = store.read_scores("test_loss")
    assert np.array_equal(got, scores[:2] + 1) and attrs["targets"] == [7, 8]
    assert store.score_names() == ["margin", "test_loss"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_snapshotted_and_written(tmp_path):
    store = make_store(tmp_path)
    p = torch.randn(P, device="cuda") + 3
    for _ in range(3):  # queue several so the writer lags the in-place updates below
        want = p.cpu().numpy().copy()
        store.write_checkpoint(0, 1, p, p, torch.ones(Q, device="cuda"))
        p.mul_(2)
    store.write_checkpoint(1, 2, p, p, torch.ones(Q, device="cuda"))
    store.flush()
    assert store.read_checkpoint(0)[1].tobytes() == want.tobytes()
    assert store.read_checkpoint(1)[1].tobytes() == p.cpu().numpy().tobytes()


def test_delete_checkpoints(tmp_path):
    store = make_store(tmp_path, "float64")
    big = np.full(P, 1.5)
    for slot in range(K):
        store.write_checkpoint(slot, slot, big, big, np.ones(Q))
    store.write_scores("s", np.ones((1, 4)), [0], "loss")
    store.flush()
    before = store.nbytes_on_disk()
    assert before > K * 2 * P * 8
    store.delete_checkpoints()
    assert store.nbytes_on_disk() < before - K * 2 * P * 8
    assert not (tmp_path / "run.zarr" / "checkpoints").exists()
    with pytest.raises(StoreError, match="train"):
        store.checkpoint_steps()
    assert store.score_names() == ["s"] and store.read_schedule()[0].shape == (T, B)
