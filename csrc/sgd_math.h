// Per-element math of the fused SGD step and its adjoint, shared by the CPU and CUDA kernels so
// that both evaluate exactly the same formulas, in the same order, as fastreplay/optim.py.
// Plain C++ (no ATen): compiles with g++ as well as nvcc.
#pragma once

#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FR_HD __host__ __device__ __forceinline__
#else
#define FR_HD inline
#endif

namespace fastreplay {

// group_ends has at most this many entries (checked on the host with a readable message).
constexpr int kMaxGroups = 8;

// Per-group hyper-parameters, passed to CUDA kernels by value. T is the compute type (float for
// f32/bf16/f16, double for f64): lr/wd/mu are rounded to T once, like PyTorch does when a Python
// float multiplies a float32 tensor in the reference.
template <typename T>
struct GroupTable {
  int64_t ends[kMaxGroups];  // cumulative; entries past the last group are padded with P
  T lr[kMaxGroups];
  T wd[kMaxGroups];
};

// Host side: build the table from validated lists (n in [1, kMaxGroups], ends non-decreasing).
template <typename T>
inline GroupTable<T> make_group_table(const int64_t* ends, const double* lrs, const double* wds,
                                      int n) {
  GroupTable<T> t;
  for (int g = 0; g < kMaxGroups; ++g) {
    const int k = g < n ? g : n - 1;
    t.ends[g] = ends[k];
    t.lr[g] = static_cast<T>(g < n ? lrs[k] : 0.0);
    t.wd[g] = static_cast<T>(g < n ? wds[k] : 0.0);
  }
  return t;
}

// Group of column `col` (0 <= col < P) = number of group ends <= col (ends are sorted; empty
// groups are skipped naturally). Fully unrolled with constant indices so that on the GPU the
// table stays in the kernel-parameter bank instead of being copied to local memory.
template <typename T>
FR_HD int find_group(const GroupTable<T>& t, int64_t col) {
  int g = 0;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 0; k < kMaxGroups - 1; ++k) g += (col >= t.ends[k]) ? 1 : 0;
  return g;
}

// a[g] with constant indices only (same reason as above).
template <typename T>
FR_HD T pick(const T (&a)[kMaxGroups], int g) {
  T v = a[0];
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int k = 1; k < kMaxGroups; ++k) v = (g == k) ? a[k] : v;
  return v;
}

// Forward step, reference order (optim.sgd_step_reference):
//   g = grad + wd*theta (g = grad when wd == 0, so inf/nan in theta do not leak through 0*x)
//   m = mu*m + g;  d = g + mu*m (Nesterov) or m;  theta = theta - lr*d
template <typename T>
FR_HD void sgd_step_elem(T& theta, T& m, T grad, T lr, T wd, T mu, bool nesterov) {
  const T g = (wd != T(0)) ? grad + wd * theta : grad;
  m = m * mu + g;
  const T d = nesterov ? g + mu * m : m;
  theta = theta - lr * d;
}

// Reverse step (optim.sgd_adjoint_reference); theta_bar already holds theta_bar + hvp:
//   d_bar = theta_bar * (-lr)
//   Nesterov: m_tilde = m_bar + mu*d_bar, g_bar = d_bar + m_tilde;  plain: m_tilde = m_bar + d_bar,
//   g_bar = m_tilde;  m_bar = m_tilde*mu;  theta_bar += wd*g_bar (skipped when wd == 0)
template <typename T>
FR_HD void sgd_adjoint_elem(T& tb, T& mb, T& gb, T neg_lr, T wd, T mu, bool nesterov) {
  const T d_bar = tb * neg_lr;
  T m_tilde;
  if (nesterov) {
    m_tilde = mb + mu * d_bar;
    gb = d_bar + m_tilde;
  } else {
    m_tilde = mb + d_bar;
    gb = m_tilde;
  }
  mb = m_tilde * mu;
  if (wd != T(0)) tb = tb + wd * gb;
}

}  // namespace fastreplay
