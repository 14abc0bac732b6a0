"""Fused custom ops torch.ops.fastreplay.* (csrc/) vs the PyTorch reference (fastreplay/core/optim.py).

Tolerances: the fused kernels evaluate the same formulas in the same order and in the same
precision as the reference, but the reference runs several ATen kernels (some of which contract
a + alpha*b into one FMA, e.g. add_(x, alpha=mu) on vectorized CPU and CUDA paths) while the fused
kernel may contract differently (nvcc contracts a*b + c by default). Each such difference is one
rounding of an intermediate, so results agree to a few ulps of the magnitudes involved (|x| <~ 10
here): float64 to ~1e-14 and float32 to ~1e-6 (ulp(8) is 9.5e-7 in float32), relative and absolute.
"""
from __future__ import annotations

import os

import pytest
import torch

from fastreplay.core.optim import sgd_adjoint_reference, sgd_step_reference

try:  # importing the extension registers torch.ops.fastreplay.*
    import fastreplay._C  # noqa: F401

    _LOAD_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the build
    _LOAD_ERROR = f"{type(exc).__name__}: {exc}"

if _LOAD_ERROR is not None:
    if os.environ.get("FASTREPLAY_REQUIRE_EXT") == "1":
        raise ImportError(f"FASTREPLAY_REQUIRE_EXT=1 but fastreplay._C failed to import: "
                          f"{_LOAD_ERROR}")
    pytest.skip(f"fastreplay._C is not built ({_LOAD_ERROR}); build it with "
                "`pip install --no-build-isolation -e .`", allow_module_level=True)

ops = torch.ops.fastreplay
HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.cuda
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
needs_cuda_kernels = pytest.mark.skipif(not (HAS_CUDA and ops.built_with_cuda()),
                                        reason="needs a CUDA GPU and an extension built with CUDA")
# Every kernel test runs on the CPU and, where there is a GPU and CUDA kernels, on CUDA too.
DEVICES = ["cpu", pytest.param("cuda", marks=[cuda, needs_cuda_kernels])]

TOL = {torch.float64: dict(rtol=1e-14, atol=1e-14), torch.float32: dict(rtol=1e-6, atol=1e-6)}
SIZES = [1, 7, 1023, 100003]


def make_groups(P: int, n_groups: int, gen: torch.Generator):
    """Random cumulative group ends (groups may be empty when P is small), lrs, wds (group 1 has
    wd 0), mu."""
    cuts = sorted(torch.randint(0, P + 1, (n_groups - 1,), generator=gen).tolist())
    ends = cuts + [P]
    lrs = (0.01 + 0.49 * torch.rand(n_groups, generator=gen, dtype=torch.float64)).tolist()
    wds = (1e-4 + 0.1 * torch.rand(n_groups, generator=gen, dtype=torch.float64)).tolist()
    if n_groups >= 2:
        wds[1] = 0.0
    mu = 0.5 + 0.49 * torch.rand((), generator=gen, dtype=torch.float64).item()
    return ends, lrs, wds, mu


def randn(shape, dtype, device, gen):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)


def check_step(P, n_groups, nesterov, dtype, device, shape=None, seed=0):
    gen = torch.Generator().manual_seed(seed * 7919 + P * 31 + n_groups)
    ends, lrs, wds, mu = make_groups(P, n_groups, gen)
    shape = shape or (P,)
    fused = [randn(shape, dtype, device, gen) for _ in range(3)]  # theta, momentum, grad
    ref = [t.clone() for t in fused]
    ops.sgd_step_(*fused, ends, lrs, wds, mu, nesterov)
    sgd_step_reference(*ref, ends, lrs, wds, mu, nesterov)
    for name, a, b in zip(("theta", "momentum", "grad"), fused, ref):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def check_adjoint(P, n_groups, nesterov, dtype, device, batch, with_hvp, seed=0):
    gen = torch.Generator().manual_seed(seed * 7919 + P * 31 + n_groups + 1000 * len(batch))
    ends, lrs, wds, mu = make_groups(P, n_groups, gen)
    shape = (*batch, P)
    fused = [randn(shape, dtype, device, gen) for _ in range(3)]  # theta_bar, m_bar, g_bar
    hvp = randn(shape, dtype, device, gen) if with_hvp else None
    ref = [t.clone() for t in fused]
    ops.sgd_adjoint_(*fused, hvp, ends, lrs, wds, mu, nesterov)
    sgd_adjoint_reference(*ref, hvp, ends, lrs, wds, mu, nesterov)
    for name, a, b in zip(("theta_bar", "m_bar", "g_bar"), fused, ref):
        torch.testing.assert_close(a, b, **TOL[dtype], msg=lambda m: f"{name}: {m}")


def test_built_with_cuda_is_bool():
    assert isinstance(ops.built_with_cuda(), bool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("n_groups", [1, 2, 3])
@pytest.mark.parametrize("P", SIZES)
@pytest.mark.parametrize("device", DEVICES)
def test_step(P, n_groups, nesterov, dtype, device):
    check_step(P, n_groups, nesterov, dtype, device)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", DEVICES)
def test_step_leading_dims(dtype, nesterov, device):
    check_step(1023, 3, nesterov, dtype, device, shape=(3, 1023))


@pytest.mark.parametrize("with_hvp", [False, True])
@pytest.mark.parametrize("batch", [(), (3,)], ids=["P", "KxP"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("n_groups", [1, 2, 3])
@pytest.mark.parametrize("P", SIZES)
@pytest.mark.parametrize("device", DEVICES)
def test_adjoint(P, n_groups, nesterov, dtype, batch, with_hvp, device):
    check_adjoint(P, n_groups, nesterov, dtype, device, batch, with_hvp)


def check_step_low_precision(dtype, device, nesterov, P=1023):
    """bf16/f16 step: the kernel computes in float32 and rounds once on store; compare with the
    float32 reference on upcast inputs, at the low-precision format's resolution."""
    gen = torch.Generator().manual_seed(5)
    ends, lrs, wds, mu = make_groups(P, 3, gen)
    fused = [randn((P,), dtype, device, gen) for _ in range(3)]
    ref = [t.float() for t in fused]
    ops.sgd_step_(*fused, ends, lrs, wds, mu, nesterov)
    sgd_step_reference(*ref, ends, lrs, wds, mu, nesterov)
    for a, b in zip(fused, ref):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", DEVICES)
def test_step_low_precision(dtype, nesterov, device):
    check_step_low_precision(dtype, device, nesterov)


def test_empty_and_empty_groups():
    # a zero-size group in the middle and an empty leading batch are accepted
    check_step(10, 3, True, torch.float64, "cpu")
    z = torch.empty(0, 5)
    ops.sgd_adjoint_(z, z.clone(), z.clone(), None, [2, 2, 5], [0.1, 0.2, 0.3], [0.0, 0.1, 0.0],
                     0.9, True)
    t = torch.randn(5, dtype=torch.float64)
    m, g = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    r = [x.clone() for x in (t, m, g)]
    ops.sgd_step_(t, m, g, [2, 2, 5], [0.1, 0.2, 0.3], [0.0, 0.1, 0.0], 0.9, False)
    sgd_step_reference(*r, [2, 2, 5], [0.1, 0.2, 0.3], [0.0, 0.1, 0.0], 0.9, False)
    torch.testing.assert_close(t, r[0], rtol=1e-14, atol=1e-14)


# --- argument checks: readable RuntimeErrors from TORCH_CHECK --------------------------------

def _step_args(P=8, dtype=torch.float32, device="cpu"):
    t = [torch.randn(P, dtype=dtype, device=device) for _ in range(3)]
    return t, [3, P], [0.1, 0.2], [0.0, 0.01], 0.9, True


def _adj_args(P=8, dtype=torch.float32, device="cpu"):
    t = [torch.randn(3, P, dtype=dtype, device=device) for _ in range(4)]
    return t[:3], t[3], [3, P], [0.1, 0.2], [0.0, 0.01], 0.9, False


def test_error_different_devices():
    (t, m, g), ends, lrs, wds, mu, nest = _step_args()
    with pytest.raises(RuntimeError, match="momentum is on meta but theta is on cpu"):
        ops.sgd_step_(t, m.to("meta"), g, ends, lrs, wds, mu, nest)
    (tb, mb, gb), h, ends, lrs, wds, mu, nest = _adj_args()
    with pytest.raises(RuntimeError, match="hvp is on meta but theta_bar is on cpu"):
        ops.sgd_adjoint_(tb, mb, gb, h.to("meta"), ends, lrs, wds, mu, nest)


def test_error_dtype():
    (t, m, g), ends, lrs, wds, mu, nest = _step_args()
    with pytest.raises(RuntimeError, match="grad has dtype Double but theta has dtype Float"):
        ops.sgd_step_(t, m, g.double(), ends, lrs, wds, mu, nest)
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.sgd_step_(*(x.int() for x in (t, m, g)), ends, lrs, wds, mu, nest)
    (tb, mb, gb), h, ends, lrs, wds, mu, nest = _adj_args()
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        ops.sgd_adjoint_(*(x.bfloat16() for x in (tb, mb, gb)), None, ends, lrs, wds, mu, nest)


def test_error_non_contiguous():
    (t, m, g), ends, lrs, wds, mu, nest = _step_args()
    with pytest.raises(RuntimeError, match="momentum is not contiguous"):
        ops.sgd_step_(t, torch.randn(16)[::2], g, ends, lrs, wds, mu, nest)
    (tb, mb, gb), h, ends, lrs, wds, mu, nest = _adj_args()
    with pytest.raises(RuntimeError, match="theta_bar is not contiguous"):
        ops.sgd_adjoint_(torch.randn(8, 3).t(), mb, gb, h, ends, lrs, wds, mu, nest)


def test_error_last_dim():
    (t, m, g), _, lrs, wds, mu, nest = _step_args()
    with pytest.raises(RuntimeError, match="last dimension of theta is 8 but group_ends.-1. is 9"):
        ops.sgd_step_(t, m, g, [3, 9], lrs, wds, mu, nest)
    (tb, mb, gb), h, _, lrs, wds, mu, nest = _adj_args()
    with pytest.raises(RuntimeError, match="group_ends.-1. is 7"):
        ops.sgd_adjoint_(tb, mb, gb, h, [3, 7], lrs, wds, mu, nest)


def test_error_list_lengths():
    (t, m, g), ends, lrs, wds, mu, nest = _step_args()
    with pytest.raises(RuntimeError, match=r"len\(lrs\)=1 but len\(group_ends\)=2"):
        ops.sgd_step_(t, m, g, ends, [0.1], wds, mu, nest)
    with pytest.raises(RuntimeError, match=r"len\(wds\)=3 but len\(group_ends\)=2"):
        ops.sgd_step_(t, m, g, ends, lrs, [0.0, 0.0, 0.0], mu, nest)
    with pytest.raises(RuntimeError, match="1 to 8 entries"):
        ops.sgd_step_(t, m, g, list(range(1, 10)), [0.1] * 9, [0.0] * 9, mu, nest)
    with pytest.raises(RuntimeError, match="non-decreasing"):
        ops.sgd_step_(t, m, g, [5, 3, 8], [0.1] * 3, [0.0] * 3, mu, nest)
    (tb, mb, gb), h, ends, lrs, wds, mu, nest = _adj_args()
    with pytest.raises(RuntimeError, match=r"len\(lrs\)=3 but len\(group_ends\)=2"):
        ops.sgd_adjoint_(tb, mb, gb, h, ends, [0.1, 0.1, 0.1], wds, mu, nest)


def test_error_shapes():
    (t, m, g), ends, lrs, wds, mu, nest = _step_args()
    with pytest.raises(RuntimeError, match=r"momentum has shape \[2, 8\] but theta has shape \[8\]"):
        ops.sgd_step_(t, torch.randn(2, 8), g, ends, lrs, wds, mu, nest)
    (tb, mb, gb), h, ends, lrs, wds, mu, nest = _adj_args()
    with pytest.raises(RuntimeError, match=r"hvp has shape \[8\] but theta_bar has shape \[3, 8\]"):
        ops.sgd_adjoint_(tb, mb, gb, h[0].contiguous(), ends, lrs, wds, mu, nest)
    with pytest.raises(RuntimeError, match="at least one dimension"):
        ops.sgd_step_(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), [1], [0.1], [0.0],
                      mu, nest)


def test_error_aliasing():
    (t, m, g), ends, lrs, wds, mu, nest = _step_args()
    with pytest.raises(RuntimeError, match="theta and momentum share memory"):
        ops.sgd_step_(t, t, g, ends, lrs, wds, mu, nest)
    buf = torch.randn(24)  # disjoint views of one buffer are fine
    ops.sgd_step_(buf[:8], buf[8:16], buf[16:], ends, lrs, wds, mu, nest)


# --- fake tensors / torch.compile ----------------------------------------------------------

def test_opcheck_step():
    (t, m, g), ends, lrs, wds, mu, nest = _step_args(P=33)
    torch.library.opcheck(ops.sgd_step_.default, (t, m, g, [10, 33], lrs, wds, mu, nest))


@pytest.mark.parametrize("with_hvp", [False, True])
def test_opcheck_adjoint(with_hvp):
    (tb, mb, gb), h, ends, lrs, wds, mu, nest = _adj_args(P=33, dtype=torch.float64)
    torch.library.opcheck(ops.sgd_adjoint_.default,
                          (tb, mb, gb, h if with_hvp else None, [10, 33], lrs, wds, mu, nest))


# --- CUDA ----------------------------------------------------------------------------------

@cuda
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_cuda_unaligned(dtype):
    """Views starting one element into their buffer take the scalar (non-vectorized) path."""
    gen = torch.Generator().manual_seed(11)
    P = 1029
    ends, lrs, wds, mu = make_groups(P, 3, gen)
    fused = [randn((P + 1,), dtype, "cuda", gen)[1:] for _ in range(3)]
    assert fused[0].data_ptr() % 16 != 0
    low = dtype == torch.bfloat16
    ref = [t.float() if low else t.clone() for t in fused]
    ops.sgd_step_(*fused, ends, lrs, wds, mu, True)
    sgd_step_reference(*ref, ends, lrs, wds, mu, True)
    tol = dict(rtol=1e-2, atol=1e-2) if low else TOL[dtype]
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a.to(b.dtype), b, **tol)


@cuda
@needs_cuda_kernels
def test_cuda_error_different_devices():
    (t, m, g), ends, lrs, wds, mu, nest = _step_args(device="cuda")
    with pytest.raises(RuntimeError, match="grad is on cpu but theta is on cuda"):
        ops.sgd_step_(t, m, g.cpu(), ends, lrs, wds, mu, nest)
    (tb, mb, gb), h, ends, lrs, wds, mu, nest = _adj_args()
    with pytest.raises(RuntimeError, match="m_bar is on cuda:0 but theta_bar is on cpu"):
        ops.sgd_adjoint_(tb, mb.cuda(), gb, h, ends, lrs, wds, mu, nest)


@cuda
@needs_cuda_kernels
def test_opcheck_cuda():
    (t, m, g), ends, lrs, wds, mu, nest = _step_args(P=33, device="cuda")
    torch.library.opcheck(ops.sgd_step_.default, (t, m, g, [10, 33], lrs, wds, mu, nest))
    (tb, mb, gb), h, ends, lrs, wds, mu, nest = _adj_args(P=33, device="cuda")
    torch.library.opcheck(ops.sgd_adjoint_.default, (tb, mb, gb, h, [10, 33], lrs, wds, mu, nest))
