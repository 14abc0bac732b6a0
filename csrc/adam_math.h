// Per-element math of the fused Adam / AdamW step and its adjoint, shared by the CPU and CUDA
// kernels so that both evaluate the formulas of fastreplay/core/optim.py (adam_step_reference,
// adam_adjoint_reference) in the same order. Plain C++ (no ATen): compiles with g++ and nvcc.
#pragma once

#include <cmath>

#include "sgd_math.h"  // FR_HD, GroupTable

namespace fastreplay {

// The per-run scalars of a step (c1 = 1 / (1 - beta1^k), c2 = 1 / (1 - beta2^k)). The
// complements 1 - beta are rounded once from double (as the reference's Python floats are):
// in float32, 1 - 0.999 computed in float would be off by 5e-5 relative.
template <typename T>
struct AdamScalars {
  T b1, b2, one_minus_b1, one_minus_b2, eps, eps_root, c1, c2;
  bool decoupled;  // adamw: decay theta directly instead of adding wd * theta to the gradient
};

template <typename T>
inline AdamScalars<T> make_adam_scalars(double b1, double b2, double eps, double eps_root,
                                        double c1, double c2, bool decoupled) {
  return {static_cast<T>(b1), static_cast<T>(b2), static_cast<T>(1.0 - b1),
          static_cast<T>(1.0 - b2), static_cast<T>(eps), static_cast<T>(eps_root),
          static_cast<T>(c1), static_cast<T>(c2), decoupled};
}

// a * b rounded on its own, as the reference's separate tensor product is: nvcc would contract
// grad + wd * theta into one fused multiply-add, and where grad and -wd * theta nearly cancel
// that changes g (and the update, which divides by roots of g^2) far beyond an ulp of theta.
template <typename T>
FR_HD T mul_rn(T a, T b) {
#ifdef __CUDA_ARCH__
  if constexpr (sizeof(T) == sizeof(float)) return __fmul_rn(a, b);
  else return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

template <typename T>
FR_HD T adam_effective_grad(T grad, T theta, T wd, const AdamScalars<T>& s) {
  return (wd != T(0) && !s.decoupled) ? grad + mul_rn(wd, theta) : grad;
}

// Forward step on one element: m, v are this element's first and second moments.
template <typename T>
FR_HD void adam_step_elem(T& theta, T& m, T& v, T grad, T lr, T wd, const AdamScalars<T>& s) {
  const T g = adam_effective_grad(grad, theta, wd, s);
  m = m * s.b1 + g * s.one_minus_b1;
  v = v * s.b2 + g * g * s.one_minus_b2;
  const T u = (m * s.c1) / (std::sqrt(v * s.c2 + s.eps_root) + s.eps);
  if (wd != T(0) && s.decoupled) theta = theta * (T(1) - lr * wd);
  theta = theta - lr * u;
}

// Reverse step on one element of one measurement; tb already holds theta_bar + hvp. grad, theta,
// m, v are the step's forward values (moments before the step).
template <typename T>
FR_HD void adam_adjoint_elem(T& tb, T& mb, T& vb, T& gb, T grad, T theta, T m, T v, T lr, T wd,
                             const AdamScalars<T>& s) {
  const T g = adam_effective_grad(grad, theta, wd, s);
  const T m_new = s.b1 * m + s.one_minus_b1 * g;
  const T v_new = s.b2 * v + s.one_minus_b2 * g * g;
  const T root = std::sqrt(v_new * s.c2 + s.eps_root);
  const T denom = root + s.eps;
  const T u_bar = tb * (-lr);
  const T m_tilde = mb + u_bar * (s.c1 / denom);
  const T dv = root > T(0) ? (m_new * (s.c1 * s.c2)) / (T(2) * root * denom * denom) : T(0);
  const T v_tilde = vb - u_bar * dv;
  gb = m_tilde * s.one_minus_b1 + (T(2) * s.one_minus_b2) * g * v_tilde;
  mb = m_tilde * s.b1;
  vb = v_tilde * s.b2;
  if (wd != T(0)) tb = s.decoupled ? tb * (T(1) - lr * wd) : tb + wd * gb;
}

}  // namespace fastreplay
