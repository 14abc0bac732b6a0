// CUDA kernels of torch.ops.fastreplay.sgd_step_ / sgd_adjoint_ (one grid-stride pass over
// memory, 16-byte vector loads/stores when every pointer is 16-byte aligned) and adam_step_ /
// adam_adjoint_. Math: sgd_math.h, adam_math.h.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
// c10/cuda only (not ATen/cuda/CUDAContext.h, which needs the cuBLAS/cuSPARSE headers too).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "adam_math.h"
#include "sgd_math.h"

namespace fastreplay {

// Defined in ops.cpp (same checks and messages on every device).
void check_step_args(const at::Tensor& theta, const at::Tensor& momentum, const at::Tensor& grad,
                     c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                     c10::ArrayRef<double> wds);
void check_adjoint_args(const at::Tensor& theta_bar, const at::Tensor& m_bar,
                        const at::Tensor& g_bar, const std::optional<at::Tensor>& hvp,
                        c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                        c10::ArrayRef<double> wds);

void check_adam_step_args(const at::Tensor& theta, const at::Tensor& state, const at::Tensor& grad,
                          c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                          c10::ArrayRef<double> wds);
void check_adam_adjoint_args(const at::Tensor& theta_bar, const at::Tensor& state_bar,
                             const at::Tensor& g_bar, const std::optional<at::Tensor>& hvp,
                             const at::Tensor& grad, const at::Tensor& theta,
                             const at::Tensor& state, c10::IntArrayRef group_ends,
                             c10::ArrayRef<double> lrs, c10::ArrayRef<double> wds);

namespace {

template <typename scalar_t, int N>
struct alignas(sizeof(scalar_t) * N) Pack {
  scalar_t v[N];
};

template <int N, typename scalar_t, typename index_t>
__device__ __forceinline__ Pack<scalar_t, N> load(const scalar_t* p, index_t i) {
  return *reinterpret_cast<const Pack<scalar_t, N>*>(p + i);
}
template <int N, typename scalar_t, typename index_t>
__device__ __forceinline__ void store(scalar_t* p, index_t i, const Pack<scalar_t, N>& v) {
  *reinterpret_cast<Pack<scalar_t, N>*>(p + i) = v;
}

// Each op functor updates the N elements [i, i + N); col = i % P is the column of element i and
// advances (with wrap-around at P) inside the pack, so the modulo is paid once per pack.
template <typename scalar_t>
struct StepOp {
  using T = at::opmath_type<scalar_t>;  // float for f32/bf16/f16, double for f64
  scalar_t* theta;
  scalar_t* mom;
  const scalar_t* grad;
  GroupTable<T> tab;
  T mu;
  bool nesterov;

  template <int N, typename index_t>
  __device__ __forceinline__ void apply(index_t i, index_t col, index_t P) const {
    auto th = load<N>(theta, i);
    auto m = load<N>(mom, i);
    const auto gr = load<N>(grad, i);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const int g = find_group(tab, static_cast<int64_t>(col));
      T t = th.v[k], mm = m.v[k];
      sgd_step_elem<T>(t, mm, static_cast<T>(gr.v[k]), pick(tab.lr, g), pick(tab.wd, g), mu,
                       nesterov);
      th.v[k] = t;
      m.v[k] = mm;
      if (++col == P) col = 0;
    }
    store<N>(theta, i, th);
    store<N>(mom, i, m);
  }
};

template <typename T>
struct AdjointOp {
  T* tb;
  T* mb;
  T* gb;
  const T* hvp;  // nullptr when not given
  GroupTable<T> tab;
  T mu;
  bool nesterov;

  template <int N, typename index_t>
  __device__ __forceinline__ void apply(index_t i, index_t col, index_t P) const {
    auto t = load<N>(tb, i);
    auto m = load<N>(mb, i);
    Pack<T, N> g;  // g_bar is write-only
    if (hvp != nullptr) {
      const auto h = load<N>(hvp, i);
#pragma unroll
      for (int k = 0; k < N; ++k) t.v[k] = t.v[k] + h.v[k];
    }
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const int grp = find_group(tab, static_cast<int64_t>(col));
      sgd_adjoint_elem<T>(t.v[k], m.v[k], g.v[k], -pick(tab.lr, grp), pick(tab.wd, grp), mu,
                          nesterov);
      if (++col == P) col = 0;
    }
    store<N>(tb, i, t);
    store<N>(mb, i, m);
    store<N>(gb, i, g);
  }
};

// Packs of VEC elements, then the numel % VEC tail one element at a time.
template <int VEC, typename index_t, typename Op>
__global__ void __launch_bounds__(256) grouped_kernel(const Op op, index_t numel, index_t P) {
  const index_t tid = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  const index_t npacks = numel / VEC;
  for (index_t p = tid; p < npacks; p += stride) {
    const index_t i = p * VEC;
    op.template apply<VEC>(i, i % P, P);
  }
  if (VEC > 1)
    for (index_t i = npacks * VEC + tid; i < numel; i += stride) op.template apply<1>(i, i % P, P);
}

template <int VEC, typename index_t, typename Op>
void launch_kernel(const Op& op, int64_t numel, int64_t P) {
  constexpr int threads = 256;
  // Enough blocks to fill the GPU a few times over; the grid-stride loop covers the rest.
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount,
                                        c10::cuda::current_device()));
  const int64_t max_blocks = static_cast<int64_t>(sms) * 8;
  const int64_t work = (numel + VEC - 1) / VEC;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(
      (work + threads - 1) / threads, max_blocks)));
  grouped_kernel<VEC, index_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      op, static_cast<index_t>(numel), static_cast<index_t>(P));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Picks the vector width (16 bytes when all pointers allow it) and a 32-bit index when possible
// (uint32_t: p + stride cannot overflow for numel <= INT32_MAX).
template <typename scalar_t, typename Op>
void launch(const Op& op, int64_t numel, int64_t P, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / sizeof(scalar_t);
  bool aligned = true;
  for (const void* p : ptrs)
    aligned = aligned && (p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0);
  const bool small = numel <= std::numeric_limits<int32_t>::max();
  if (aligned && small) launch_kernel<V, uint32_t>(op, numel, P);
  else if (aligned) launch_kernel<V, int64_t>(op, numel, P);
  else if (small) launch_kernel<1, uint32_t>(op, numel, P);
  else launch_kernel<1, int64_t>(op, numel, P);
}

void sgd_step_cuda(const at::Tensor& theta, const at::Tensor& momentum, const at::Tensor& grad,
                   c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                   c10::ArrayRef<double> wds, double mu, bool nesterov) {
  check_step_args(theta, momentum, grad, group_ends, lrs, wds);
  const int64_t numel = theta.numel(), P = group_ends.back();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(theta.device());
  const auto st = theta.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "sgd_step_cuda", [&] {
    using T = at::opmath_type<scalar_t>;
    const StepOp<scalar_t> op{theta.mutable_data_ptr<scalar_t>(),
                              momentum.mutable_data_ptr<scalar_t>(),
                              grad.const_data_ptr<scalar_t>(),
                              make_group_table<T>(group_ends.data(), lrs.data(), wds.data(),
                                                  static_cast<int>(group_ends.size())),
                              static_cast<T>(mu), nesterov};
    launch<scalar_t>(op, numel, P, {op.theta, op.mom, op.grad});
  });
}

void sgd_adjoint_cuda(const at::Tensor& theta_bar, const at::Tensor& m_bar, const at::Tensor& g_bar,
                      const std::optional<at::Tensor>& hvp, c10::IntArrayRef group_ends,
                      c10::ArrayRef<double> lrs, c10::ArrayRef<double> wds, double mu,
                      bool nesterov) {
  check_adjoint_args(theta_bar, m_bar, g_bar, hvp, group_ends, lrs, wds);
  const int64_t numel = theta_bar.numel(), P = group_ends.back();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(theta_bar.device());
  AT_DISPATCH_FLOATING_TYPES(theta_bar.scalar_type(), "sgd_adjoint_cuda", [&] {
    const bool has_hvp = hvp.has_value() && hvp->defined();
    const AdjointOp<scalar_t> op{theta_bar.mutable_data_ptr<scalar_t>(),
                                 m_bar.mutable_data_ptr<scalar_t>(),
                                 g_bar.mutable_data_ptr<scalar_t>(),
                                 has_hvp ? hvp->const_data_ptr<scalar_t>() : nullptr,
                                 make_group_table<scalar_t>(group_ends.data(), lrs.data(),
                                                            wds.data(),
                                                            static_cast<int>(group_ends.size())),
                                 static_cast<scalar_t>(mu), nesterov};
    launch<scalar_t>(op, numel, P, {op.tb, op.mb, op.gb, op.hvp});
  });
}

// Adam: one element per thread and iteration (the (..., 2P) state is addressed per row, which
// 16-byte packs would have to split at row ends); still one coalesced pass over memory.
template <typename T>
struct AdamStepOp {
  T* theta;
  T* state;
  const T* grad;
  GroupTable<T> tab;
  AdamScalars<T> sc;

  template <int N, typename index_t>
  __device__ __forceinline__ void apply(index_t i, index_t col, index_t P) const {
    static_assert(N == 1, "Adam ops run one element at a time");
    const int g = find_group(tab, static_cast<int64_t>(col));
    const index_t mi = (i / P) * 2 * P + col;
    T t = theta[i], m = state[mi], v = state[mi + P];
    adam_step_elem<T>(t, m, v, grad[i], pick(tab.lr, g), pick(tab.wd, g), sc);
    theta[i] = t;
    state[mi] = m;
    state[mi + P] = v;
  }
};

template <typename T>
struct AdamAdjointOp {
  T* tb;
  T* sb;
  T* gb;
  const T* hvp;  // nullptr when not given
  const T* grad;
  const T* theta;
  const T* state;
  GroupTable<T> tab;
  AdamScalars<T> sc;

  template <int N, typename index_t>
  __device__ __forceinline__ void apply(index_t i, index_t col, index_t P) const {
    static_assert(N == 1, "Adam ops run one element at a time");
    const int g = find_group(tab, static_cast<int64_t>(col));
    const index_t mi = (i / P) * 2 * P + col;
    T t = hvp != nullptr ? tb[i] + hvp[i] : tb[i], mb = sb[mi], vb = sb[mi + P], gbar;
    adam_adjoint_elem<T>(t, mb, vb, gbar, grad[col], theta[col], state[col], state[col + P],
                         pick(tab.lr, g), pick(tab.wd, g), sc);
    tb[i] = t;
    sb[mi] = mb;
    sb[mi + P] = vb;
    gb[i] = gbar;
  }
};

template <typename Op>
void launch_scalar(const Op& op, int64_t numel, int64_t P) {
  // the state index reaches 2 numel: a 32-bit index only while that fits
  if (2 * numel <= std::numeric_limits<int32_t>::max()) launch_kernel<1, uint32_t>(op, numel, P);
  else launch_kernel<1, int64_t>(op, numel, P);
}

void adam_step_cuda(const at::Tensor& theta, const at::Tensor& state, const at::Tensor& grad,
                    c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                    c10::ArrayRef<double> wds, double b1, double b2, double eps, double eps_root,
                    double c1, double c2, bool decoupled) {
  check_adam_step_args(theta, state, grad, group_ends, lrs, wds);
  const int64_t numel = theta.numel(), P = group_ends.back();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(theta.device());
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "adam_step_cuda", [&] {
    using T = scalar_t;
    const AdamStepOp<T> op{theta.mutable_data_ptr<T>(), state.mutable_data_ptr<T>(),
                           grad.const_data_ptr<T>(),
                           make_group_table<T>(group_ends.data(), lrs.data(), wds.data(),
                                               static_cast<int>(group_ends.size())),
                           make_adam_scalars<T>(b1, b2, eps, eps_root, c1, c2, decoupled)};
    launch_scalar(op, numel, P);
  });
}

void adam_adjoint_cuda(const at::Tensor& theta_bar, const at::Tensor& state_bar,
                       const at::Tensor& g_bar, const std::optional<at::Tensor>& hvp,
                       const at::Tensor& grad, const at::Tensor& theta, const at::Tensor& state,
                       c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                       c10::ArrayRef<double> wds, double b1, double b2, double eps,
                       double eps_root, double c1, double c2, bool decoupled) {
  check_adam_adjoint_args(theta_bar, state_bar, g_bar, hvp, grad, theta, state, group_ends, lrs,
                          wds);
  const int64_t numel = theta_bar.numel(), P = group_ends.back();
  if (numel == 0) return;
  const c10::cuda::CUDAGuard guard(theta_bar.device());
  AT_DISPATCH_FLOATING_TYPES(theta_bar.scalar_type(), "adam_adjoint_cuda", [&] {
    using T = scalar_t;
    const bool has_hvp = hvp.has_value() && hvp->defined();
    const AdamAdjointOp<T> op{theta_bar.mutable_data_ptr<T>(), state_bar.mutable_data_ptr<T>(),
                              g_bar.mutable_data_ptr<T>(),
                              has_hvp ? hvp->const_data_ptr<T>() : nullptr,
                              grad.const_data_ptr<T>(), theta.const_data_ptr<T>(),
                              state.const_data_ptr<T>(),
                              make_group_table<T>(group_ends.data(), lrs.data(), wds.data(),
                                                  static_cast<int>(group_ends.size())),
                              make_adam_scalars<T>(b1, b2, eps, eps_root, c1, c2, decoupled)};
    launch_scalar(op, numel, P);
  });
}

}  // namespace
}  // namespace fastreplay

TORCH_LIBRARY_IMPL(fastreplay, CUDA, m) {
  m.impl("sgd_step_", &fastreplay::sgd_step_cuda);
  m.impl("sgd_adjoint_", &fastreplay::sgd_adjoint_cuda);
  m.impl("adam_step_", &fastreplay::adam_step_cuda);
  m.impl("adam_adjoint_", &fastreplay::adam_adjoint_cuda);
}
