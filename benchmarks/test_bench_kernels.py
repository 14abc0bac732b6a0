"""pytest-benchmark suite: fused optimizer adjoint vs the pure-PyTorch paths.

    pytest benchmarks/test_bench_kernels.py --benchmark-only [--benchmark-save=NAME]
    pytest benchmarks/test_bench_kernels.py --benchmark-only --benchmark-compare  # regressions

Runs on CUDA when available, else on the CPU. ResNet-9-sized flat parameter vector, K targets.
"""
from __future__ import annotations

import pytest
import torch

from fastreplay import kernels
from fastreplay.bench import adjoint_foreach

P = 6_573_120
SIZES = [1728, 73728, 147456, 147456, 294912, 1179648, 2359296, 2359296, 5120]
GROUP_ENDS = [sum(SIZES), P]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(params=[1, 10], ids=lambda k: f"K{k}")
def tensors(request):
    k = request.param
    tb, mb, hv = (torch.randn(k, P, device=DEVICE) for _ in range(3))
    return tb, mb, torch.empty_like(tb), hv


def _run(fn, benchmark):
    def call():
        fn()
        _sync()
    benchmark(call)


def test_adjoint_fused(benchmark, tensors):
    if not kernels._fused_available(DEVICE):
        pytest.skip("compiled extension not available")
    tb, mb, gb, hv = tensors
    _run(lambda: kernels.sgd_adjoint_(tb, mb, gb, hv, GROUP_ENDS, [0.1, 0.2], [5e-4, 0.0], 0.9,
                                      True, "fused"), benchmark)


def test_adjoint_foreach(benchmark, tensors):
    tb, mb, gb, hv = tensors
    _run(lambda: adjoint_foreach(tb, mb, gb, hv, GROUP_ENDS, [0.1, 0.2], [5e-4, 0.0], 0.9, True,
                                 SIZES), benchmark)


def test_adjoint_reference(benchmark, tensors):
    tb, mb, gb, hv = tensors
    _run(lambda: kernels.sgd_adjoint_(tb, mb, gb, hv, GROUP_ENDS, [0.1, 0.2], [5e-4, 0.0], 0.9,
                                      True, "reference"), benchmark)
