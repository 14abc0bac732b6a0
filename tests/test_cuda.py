"""The CUDA path against its oracles: finite differences of real retrainings and the
unrolled-autograd oracle (fastreplay/core/reference.py), on tiny runs (12 steps, 48 examples).

Run it on a machine with a CUDA GPU (every test here is marked cuda and skips without one):

    python -m pytest -q -m cuda tests/test_cuda.py

Sized to take a few minutes on one H200 (tiny runs; most of it the one torch.compile).

Tolerances, and why each is the right size:

* float64 against the oracle: 1e-12 of the largest score. Replay and oracle do the same
  arithmetic in different orders (per-step double backward or jvp and the fused adjoint, against
  one reverse sweep through the unrolled graph), so they differ by float64 rounding (unit
  roundoff 1.1e-16) times the accumulation depth: ~1e-15 relative on the CPU
  (tests/test_replay.py), the same on CUDA.
* float64 against finite differences: 1e-6 relative, the bound tests/test_exactness.py derives.
* fp32 against the fp32 oracle: 1e-3 relative l2. Unit roundoff is 2^-24 = 6e-8; one replay
  step sums ~1e4 products per output (batch 12 x 4x4..8x8 pixels x channels), a rounding
  walk of ~sqrt(1e4) * 6e-8 = 6e-6 relative, and the 12 reverse steps add theirs up (~1e-4);
  the oracle also re-runs training out of place, so its trajectory differs from the stored one
  in the last bits. That bounds it by ~1e-4; forward and double backward alone differ by 1.6e-5
  per step on the full preset (benchmarks/RESULTS.md), and these very runs on the CPU land at
  1e-7 (tiny-cnn) and 7e-7 (the ResNet-9 below). 1e-3 leaves room for cuDNN's coarser
  algorithms; the float64 tests are the ones that catch a wrong adjoint term (1e-3..1e-1).
* TF32 convolutions: no fixed tolerance against the TF32 oracle. TF32 rounds the convolution
  inputs to 10 mantissa bits (2^-11 = 4.9e-4), and the per-example weight gradients are inner
  products that cancel, so replay and oracle (two roundings of one derivative) measured 0.15
  relative l2 apart on the H200 for the channels_last ResNet-9 below. Both are held to the fp32
  scores of the same recipe instead: the replay must be no further from them than the oracle.
* replay.compile against the eager replay, float64: 1e-12 of the largest score. Inductor fuses
  the tangent arithmetic and may reorder sums: the same function up to float64 rounding
  (compiled vs double backward 2.2e-14 per step on the H200, benchmarks/RESULTS.md).
* CPU against CUDA, float64, the same run trained on each: 1e-10 relative l2. Same seed, data,
  batches, augmentation and initialisation on both (all drawn on the CPU); cuDNN and the CPU
  kernels round differently (~1e-16 per operation), a difference that 12 smooth steps and the
  replay amplify to ~1e-13; 1e-10 leaves a margin of 1000 and is far below any real bug.

Every recipe below is built right before it is used: a Recipe sets the process-wide TF32
flags from its config, and a rebuild must run under the flags its run was trained with.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from conftest import SMALL
from test_exactness import (
    SCHEDULES,
    TARGETS,
    assert_matches_finite_differences,
    central_differences,
)

from fastreplay.config import load_config
from fastreplay.core import kernels
from fastreplay.core.recipe import Recipe
from fastreplay.core.reference import unrolled_scores
from fastreplay.core.replay import hvp_mode, replay
from fastreplay.interface.api import counterfactual, open_or_train, run_magic

pytestmark = pytest.mark.cuda

FP32 = 1e-3
FLOAT64_VS_ORACLE = 1e-12
CPU_VS_CUDA = 1e-10
TINY_CNN = SMALL + ["model.name=tiny-cnn", "measure.kind=loss"]
# The GPU recipe's shape at test size: ResNet-9 (width 0.125), channels_last, label smoothing,
# and average pooling: the combination whose vmapped replay step failed inside torch.func on a
# GPU (the full preset with model.pool=avg), which replay.hvp=auto must now survive.
RESNET9_CHANNELS_LAST = SMALL + ["model.name=resnet9", "model.width=0.125", "model.pool=avg",
                                 "train.label_smoothing=0.1", "train.channels_last=true",
                                 "train.dtype=float32", "measure.kind=loss"]


def _cfg(overrides, *extra, device: str = "cuda"):
    return load_config("test", overrides=overrides + [f"device={device}"] + list(extra))


def _rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _oracle(cfg) -> np.ndarray:
    recipe = Recipe(cfg)
    return unrolled_scores(recipe, TARGETS, cfg.measure.kind).detach().cpu().numpy()


def _replay(cfg, store):
    """Scores of a fresh recipe's replay, and the recipe (hvp_mode tells what auto ran)."""
    recipe = Recipe(cfg)
    return replay(recipe, store, TARGETS, cfg.measure.kind).scores, recipe


def _need_cuda_kernels() -> None:
    """Fused CUDA kernels or a skip; a failure where FASTREPLAY_REQUIRE_EXT=1 (CI's rule for
    the CPU build: a broken extension must fail the tests, not skip them)."""
    if kernels.cuda_kernels_built():
        return
    why = kernels.extension_error() or "the extension was built without CUDA"
    if os.environ.get("FASTREPLAY_REQUIRE_EXT") == "1":
        pytest.fail(f"FASTREPLAY_REQUIRE_EXT=1 but there are no fused CUDA kernels ({why})")
    pytest.skip(f"no fused CUDA kernels ({why}); rebuild with nvcc present")


@dataclass
class StoredRuns:
    """One run checkpointed for each schedule, and its oracles."""
    overrides: list
    stores: dict  # schedule -> store
    oracle: np.ndarray
    examples: np.ndarray | None = None
    fd: np.ndarray | None = None


def _stored_runs(tmp_path_factory, name: str, overrides: list, with_fd: bool):
    cfg = _cfg(overrides)
    runs = StoredRuns(overrides, {}, _oracle(cfg))
    if with_fd:
        recipe = Recipe(cfg)
        runs.examples, runs.fd = central_differences(
            lambda w: counterfactual(cfg, w, TARGETS, recipe=recipe), recipe.num_train)
    for schedule, extra in SCHEDULES.items():
        run_dir = tmp_path_factory.mktemp(f"{name}-{schedule}")
        runs.stores[schedule] = open_or_train(_cfg(overrides, *extra), run_dir)[1]
    return runs


@pytest.fixture(scope="module")
def float64_runs(tmp_path_factory):
    runs = _stored_runs(tmp_path_factory, "float64", TINY_CNN, with_fd=True)
    yield runs
    for store in runs.stores.values():
        store.close()


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory):
    runs = _stored_runs(tmp_path_factory, "fp32", TINY_CNN + ["train.dtype=float32"],
                        with_fd=False)
    yield runs
    for store in runs.stores.values():
        store.close()


# --- fused kernels ---------------------------------------------------------------------------

@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_cuda_step_and_adjoint_equal_the_reference(dtype, nesterov):
    """Random inputs, three groups (the middle one empty, one without weight decay), the
    adjoint over K = 3 measurements with a pending hvp. Tolerances: a few ulps of |x| <~ 10
    (tests/test_kernels.py explains)."""
    _need_cuda_kernels()
    tol = dict(rtol=1e-14, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    gen = torch.Generator().manual_seed(17)
    size, mu = 100_003, 0.9
    ends, lrs, wds = [60_001, 60_001, size], [0.3, 0.05, 0.6], [5e-4, 1e-2, 0.0]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to("cuda", dtype)

    for op, shapes in ((kernels.sgd_step_, [(size,)] * 3),
                       (kernels.sgd_adjoint_, [(3, size)] * 4)):
        fused = [randn(*s) for s in shapes]
        ref = [t.clone() for t in fused]
        op(*fused, ends, lrs, wds, mu, nesterov, "fused")
        op(*ref, ends, lrs, wds, mu, nesterov, "reference")
        for a, b in zip(fused, ref):
            torch.testing.assert_close(a, b, **tol)


# --- float64: the oracle and finite differences ---------------------------------------------

@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("backend,hvp", [("fused", "reverse"), ("fused", "forward"),
                                         ("fused", "forward-vmap"), ("fused", "auto"),
                                         ("reference", "auto")])
def test_float64_replay_on_cuda_equals_the_oracle_and_finite_differences(
        float64_runs, backend, hvp, schedule):
    if backend == "fused":
        _need_cuda_kernels()
    cfg = _cfg(float64_runs.overrides, *SCHEDULES[schedule], f"replay.backend={backend}",
               f"replay.hvp={hvp}")
    scores, recipe = _replay(cfg, float64_runs.stores[schedule])
    if hvp == "auto":  # vmapped on CUDA for K > 1, and this model needs no fallback
        assert hvp_mode(recipe, len(TARGETS)) == "forward-vmap"
    oracle = float64_runs.oracle
    assert np.abs(oracle).max() > 1e-3
    np.testing.assert_allclose(scores, oracle, rtol=0,
                               atol=FLOAT64_VS_ORACLE * np.abs(oracle).max())
    assert_matches_finite_differences(scores, float64_runs.examples, float64_runs.fd)


def test_compiled_replay_on_cuda_equals_the_eager_one(float64_runs):
    """replay.compile with the vmapped step (what auto runs on CUDA): one compilation."""
    store = float64_runs.stores["interval"]
    eager, _ = _replay(_cfg(float64_runs.overrides, "replay.hvp=forward-vmap"), store)
    compiled, _ = _replay(_cfg(float64_runs.overrides, "replay.hvp=forward-vmap",
                               "replay.compile=true"), store)
    scale = np.abs(eager).max()
    np.testing.assert_allclose(compiled, eager, rtol=0, atol=FLOAT64_VS_ORACLE * scale)
    np.testing.assert_allclose(compiled, float64_runs.oracle, rtol=0,
                               atol=FLOAT64_VS_ORACLE * scale)


def test_cpu_and_cuda_replays_of_the_same_run_agree(float64_runs, tmp_path):
    cuda, _ = _replay(_cfg(float64_runs.overrides), float64_runs.stores["interval"])
    cpu_cfg = _cfg(float64_runs.overrides, device="cpu")
    recipe, store = open_or_train(cpu_cfg, tmp_path)
    try:
        cpu = replay(recipe, store, TARGETS, cpu_cfg.measure.kind).scores
    finally:
        store.close()
    assert _rel_l2(cuda, cpu) <= CPU_VS_CUDA


# --- fp32 and TF32: the oracle of the same precision ----------------------------------------

@pytest.mark.parametrize("hvp", ["reverse", "forward", "forward-vmap", "auto"])
def test_fp32_replay_on_cuda_matches_the_fp32_oracle(fp32_runs, hvp):
    scores, _ = _replay(_cfg(fp32_runs.overrides, f"replay.hvp={hvp}"),
                        fp32_runs.stores["interval"])
    assert np.abs(fp32_runs.oracle).max() > 1e-3
    assert _rel_l2(scores, fp32_runs.oracle) <= FP32


def test_fp32_scores_on_cuda_are_bitwise_equal_across_schedules(fp32_runs):
    """The schedules do the same per-step arithmetic on the GPU too (and the rebuilds land on
    every stored checkpoint bit for bit, or the replay would have stopped)."""
    scores = {schedule: _replay(_cfg(fp32_runs.overrides, *extra), fp32_runs.stores[schedule])[0]
              for schedule, extra in SCHEDULES.items()}
    for schedule, got in scores.items():
        np.testing.assert_array_equal(got, scores["interval"], err_msg=schedule)


def _channels_last_scores(tf32: bool, tmp_path) -> tuple[np.ndarray, np.ndarray]:
    """(replay scores with replay.hvp=auto, unrolled oracle) of the channels_last ResNet-9."""
    cfg = _cfg(RESNET9_CHANNELS_LAST, f"train.tf32={str(tf32).lower()}")
    recipe, store = open_or_train(cfg, tmp_path / f"tf32-{tf32}")
    try:
        scores = replay(recipe, store, TARGETS, "loss").scores
    finally:
        store.close()
    return scores, _oracle(cfg)


def test_channels_last_resnet9_replays_on_cuda(tmp_path):
    """replay.hvp=auto on the GPU recipe's layout: where torch cannot vmap (or
    forward-differentiate) the model it falls back down the chain instead of crashing.

    fp32: the scores match the fp32 oracle (1e-3). TF32: replay and oracle are two roundings of
    the same derivative, each off by TF32's error (10-bit mantissas in every convolution, and
    per-example weight gradients are inner products that cancel), so they are not held to each
    other; both are held to the fp32 scores of the same recipe (12 smooth steps: the fp32 and
    TF32 trajectories stay close), and the replay must be no further from them than the TF32
    oracle is (factor 2, plus the fp32 tolerance).
    """
    fp32_scores, fp32_oracle = _channels_last_scores(False, tmp_path)
    assert np.abs(fp32_oracle).max() > 1e-3
    assert _rel_l2(fp32_scores, fp32_oracle) <= FP32
    tf32_scores, tf32_oracle = _channels_last_scores(True, tmp_path)
    replay_error = _rel_l2(tf32_scores, fp32_scores)
    oracle_error = _rel_l2(tf32_oracle, fp32_scores)
    print(f"channels_last resnet9: fp32 replay vs oracle {_rel_l2(fp32_scores, fp32_oracle):.2e}; "
          f"TF32 vs fp32 scores: replay {replay_error:.2e}, oracle {oracle_error:.2e}")
    assert replay_error <= 2 * oracle_error + FP32


def test_channels_last_average_pool_magic_and_lds_run_on_cuda(tmp_path):
    """`magic` then `lds` with more than one model per batch on the channels_last ResNet-9
    with average pooling: scores through the fallback chain, retraining one model at a time
    (vmap cannot batch channels_last models), bitwise equal to single-model training."""
    from fastreplay.core.multitrain import can_batch_models, train_many
    from fastreplay.core.train import train
    from fastreplay.workflows.lds import run_lds, subset_masks
    cfg = _cfg(RESNET9_CHANNELS_LAST)
    run_magic(cfg, TARGETS, tmp_path, plots=False)
    recipe, store = open_or_train(cfg, tmp_path)
    try:
        res, _, _ = run_lds(recipe, store, models=4, keep=0.9, targets=None, models_per_batch=2)
    finally:
        store.close()
    assert res is not None and res.models == 4  # 4 models: no statistic to hold, only no crash
    assert not can_batch_models(recipe)
    w = torch.from_numpy(subset_masks(recipe.num_train, 2, 0.9, 0).astype(np.float64))
    many = train_many(recipe, w)
    for j in range(2):
        assert torch.equal(many.theta[j], train(recipe, w[j]).theta)


# --- fine-tuning recipes and Hugging Face models on CUDA --------------------------------------

def test_dropout_masks_are_the_same_bits_on_cuda_and_the_cpu():
    from fastreplay.core.dropout import dropout_context, keep_mask
    ids = torch.tensor([3, 17, 40000, 5])
    with dropout_context(7, 123, ids):
        cpu = keep_mask((4, 6, 33), layer=2, p=0.25, device="cpu")
    with dropout_context(7, 123, ids.cuda()):
        gpu = keep_mask((4, 6, 33), layer=2, p=0.25, device="cuda")
    assert torch.equal(cpu, gpu.cpu())


@pytest.mark.parametrize("hvp", ["reverse", "forward", "forward-vmap"])
def test_float64_clipped_accumulated_dropout_run_on_cuda_equals_the_oracle(hvp, tmp_path):
    """Clipping (at the median gradient norm: active on some steps), micro-batches, warm-up +
    cosine and dropout, AdamW, on CUDA in float64: replay against the unrolled oracle."""
    from test_finetune_recipes import dropout_mlp
    overrides = SMALL + ["train.optimizer=adamw", "train.lr=0.02", "train.eps=0",
                         "train.eps_root=1e-6", "train.clip_norm=1.0", "train.micro_batch=4",
                         "train.schedule=cosine", f"replay.hvp={hvp}", "device=cuda"]
    cfg = load_config("test", overrides=overrides)
    recipe, store = open_or_train(cfg, tmp_path / "run", model_factory=dropout_mlp)
    scores = replay(recipe, store, TARGETS, "loss").scores
    oracle = unrolled_scores(recipe, TARGETS, "loss").detach().cpu().numpy()
    store.close()
    np.testing.assert_allclose(scores, oracle, rtol=0,
                               atol=FLOAT64_VS_ORACLE * np.abs(oracle).max())


@pytest.mark.parametrize("lora", [False, True])
def test_hf_gpt2_replays_on_cuda_in_fp32_and_float64(lora, tmp_path):
    """A tiny transformers GPT-2 (eager attention, deterministic dropout), full fine-tune and
    LoRA, on CUDA: float64 replay against the oracle; fp32 rebuilds bit for bit (the replay's
    own check) and lands near the fp32 oracle."""
    pytest.importorskip("transformers")
    from test_huggingface import RECIPE, tiny_task

    from fastreplay.integrations.huggingface import Lora
    adapter = Lora(r=2, alpha=4, dropout=0.1) if lora else None
    for dtype, tol in (("float64", FLOAT64_VS_ORACLE), ("float32", FP32)):
        cfg = load_config("test", overrides=RECIPE + ["device=cuda", f"train.dtype={dtype}"])
        recipe, store = open_or_train(cfg, tmp_path / dtype, task=tiny_task(adapter))
        scores = replay(recipe, store, [0, 3], "loss").scores
        oracle = unrolled_scores(recipe, [0, 3], "loss").detach().cpu().numpy()
        store.close()
        assert _rel_l2(scores, oracle) <= tol, (dtype, _rel_l2(scores, oracle))
