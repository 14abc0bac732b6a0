"""pytest-benchmark suite: fused optimizer adjoint vs the pure-PyTorch paths.

    pytest benchmarks/test_bench_kernels.py --benchmark-only [--benchmark-save=NAME]
    pytest benchmarks/test_bench_kernels.py --benchmark-only --benchmark-compare  # regressions

Runs on CUDA when available, else on the CPU. ResNet-9-sized flat parameter vector, K targets.
Each benchmark first runs its adjoint once on the benchmarked inputs and checks the result:
against the update written out by hand (float64) on a sample of columns from both parameter
groups, and (fused, foreach) against the pure-PyTorch reference adjoint on whole rows.
"""
from __future__ import annotations

import pytest
import torch

from fastreplay.core import kernels
from fastreplay.core.optim import sgd_adjoint_reference
from fastreplay.workflows.bench import adjoint_foreach

P = 6_573_120
SIZES = [1728, 73728, 147456, 147456, 294912, 1179648, 2359296, 2359296, 5120]
GROUP_ENDS = [sum(SIZES), P]
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LRS, WDS, MU, NESTEROV = [0.1, 0.2], [5e-4, 0.0], 0.9, True
# Columns checked against the hand-written update: both ends of each group and a spread between.
COLUMNS = torch.cat([torch.tensor([0, GROUP_ENDS[0] - 1, GROUP_ENDS[0], P - 1]),
                     torch.arange(1, P, 9973)]).unique()


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(params=[1, 10], ids=lambda k: f"K{k}")
def tensors(request):
    k = request.param
    tb, mb, hv = (torch.randn(k, P, device=DEVICE) for _ in range(3))
    return tb, mb, torch.empty_like(tb), hv


def _by_hand(tb, mb, hv):
    """The adjoint of one Nesterov SGD step with weight decay, written out (float64):
    theta_bar += hvp; d = -lr theta_bar; m~ = m_bar + mu d; g_bar = d + m~; m_bar = mu m~;
    theta_bar += wd g_bar."""
    tb, mb, hv = (x[..., COLUMNS.to(x.device)].double() for x in (tb, mb, hv))
    in_decay = (COLUMNS < GROUP_ENDS[0]).to(tb.device)
    lr = torch.where(in_decay, LRS[0], LRS[1]).double()
    wd = torch.where(in_decay, WDS[0], WDS[1]).double()
    tb = tb + hv
    d = -lr * tb
    m_tilde = mb + MU * d
    gb = d + m_tilde
    return tb + wd * gb, MU * m_tilde, gb


def _check(adjoint, tensors, compare_with_reference=True):
    """Run ``adjoint`` once on the benchmarked inputs (it doubles as a warm-up call) and check
    its outputs: every row on the sampled columns against the hand-written update, and the
    first and last rows in full against the reference adjoint run on copies of them."""
    tb, mb, gb, hv = tensors
    rows = sorted({0, tb.shape[0] - 1})
    want_cols = _by_hand(tb, mb, hv)
    ref = [x[rows].clone() for x in tensors]
    adjoint(tb, mb, gb, hv)
    _sync()
    got = (tb, mb, gb)
    for name, a, b in zip(("theta_bar", "m_bar", "g_bar"), got, want_cols):
        torch.testing.assert_close(a[..., COLUMNS.to(a.device)].double(), b, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name} against the hand-written update: {m}")
    if compare_with_reference:
        sgd_adjoint_reference(*ref, GROUP_ENDS, LRS, WDS, MU, NESTEROV)
        for name, a, b in zip(("theta_bar", "m_bar", "g_bar"), got, ref[:3]):
            torch.testing.assert_close(a[rows], b, rtol=1e-6, atol=1e-6,
                                       msg=lambda m: f"{name} against the reference adjoint: {m}")


def _run(fn, benchmark):
    def call():
        fn()
        _sync()
    benchmark(call)


def test_adjoint_fused(benchmark, tensors):
    if not kernels._fused_available(DEVICE):
        pytest.skip("compiled extension not available")
    fused = lambda tb, mb, gb, hv: kernels.sgd_adjoint_(  # noqa: E731
        tb, mb, gb, hv, GROUP_ENDS, LRS, WDS, MU, NESTEROV, "fused")
    _check(fused, tensors)
    _run(lambda: fused(*tensors), benchmark)


def test_adjoint_foreach(benchmark, tensors):
    foreach = lambda tb, mb, gb, hv: adjoint_foreach(  # noqa: E731
        tb, mb, gb, hv, GROUP_ENDS, LRS, WDS, MU, NESTEROV, SIZES)
    _check(foreach, tensors)
    _run(lambda: foreach(*tensors), benchmark)


def test_adjoint_reference(benchmark, tensors):
    reference = lambda tb, mb, gb, hv: kernels.sgd_adjoint_(  # noqa: E731
        tb, mb, gb, hv, GROUP_ENDS, LRS, WDS, MU, NESTEROV, "reference")
    _check(reference, tensors, compare_with_reference=False)  # it is the reference
    _run(lambda: reference(*tensors), benchmark)
