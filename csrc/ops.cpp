// Custom ops torch.ops.fastreplay.*: schemas, argument checks, CPU and Meta kernels.
// The math is in sgd_math.h and adam_math.h (shared with ops_cuda.cu); the semantics are
// fastreplay/core/optim.py.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>

#include "adam_math.h"
#include "sgd_math.h"

namespace fastreplay {

namespace {

void check_lists(const char* op, c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                 c10::ArrayRef<double> wds) {
  const auto n = group_ends.size();
  TORCH_CHECK(n >= 1 && n <= static_cast<size_t>(kMaxGroups), op, ": group_ends must have 1 to ",
              kMaxGroups, " entries (the cumulative end of each parameter group), got ", n);
  TORCH_CHECK(lrs.size() == n, op, ": len(lrs)=", lrs.size(), " but len(group_ends)=", n,
              "; pass one learning rate per parameter group");
  TORCH_CHECK(wds.size() == n, op, ": len(wds)=", wds.size(), " but len(group_ends)=", n,
              "; pass one weight decay per parameter group");
  TORCH_CHECK(group_ends[0] >= 0, op, ": group_ends[0]=", group_ends[0], " is negative");
  for (size_t g = 1; g < n; ++g)
    TORCH_CHECK(group_ends[g] >= group_ends[g - 1], op, ": group_ends must be non-decreasing "
                "(cumulative group sizes), got ", group_ends);
}

// Checks `t` against the first tensor `ref` (named ref_name). Works on Meta tensors with
// symbolic shapes (torch.compile), where contiguity and memory overlap are not checked.
// `t` is defined and has the device and dtype of `ref` (named ref_name).
void check_like(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                const char* ref_name) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device(), "; move all tensors to the same device");
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(),
              "; all tensors must have the same dtype");
}

void check_tensor(const char* op, const at::Tensor& t, const char* name, const at::Tensor& ref,
                  const char* ref_name, int64_t P) {
  check_like(op, t, name, ref, ref_name);
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have at least one dimension (..., P)");
  TORCH_CHECK(t.sym_sizes() == ref.sym_sizes(), op, ": ", name, " has shape ", t.sym_sizes(),
              " but ", ref_name, " has shape ", ref.sym_sizes(), "; all tensors must have the "
              "same shape");
  TORCH_CHECK(t.sym_size(-1) == P, op, ": the last dimension of ", name, " is ", t.sym_size(-1),
              " but group_ends[-1] is ", P, "; the last dimension must be the flat parameter "
              "vector covered by the groups");
  if (!t.is_meta()) {
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " is not contiguous (strides ", t.strides(),
                "); the op updates tensors in place, so pass contiguous tensors (e.g. allocate "
                "them with .contiguous() once and keep using them)");
  }
}

// A tensor of an Adam op, whose state is (..., 2P) and whose forward values are one run's (P,)
// or (2P,): same device and dtype as ref, contiguous; `single`: exactly (last,), else the
// leading shape of ref and a last dimension of `last`.
void check_adam_tensor(const char* op, const at::Tensor& t, const char* name,
                       const at::Tensor& ref, const char* ref_name, int64_t last, bool single) {
  check_like(op, t, name, ref, ref_name);
  if (single) {
    TORCH_CHECK(t.dim() == 1 && t.sym_size(0) == last, op, ": ", name, " must have shape [",
                last, "] (one run's values), got ", t.sym_sizes());
  } else {
    bool same_lead = t.dim() == ref.dim() && t.dim() >= 1;
    for (int64_t d = 0; same_lead && d + 1 < t.dim(); ++d)
      same_lead = t.sym_size(d) == ref.sym_size(d);
    TORCH_CHECK(same_lead, op, ": ", name, " has shape ", t.sym_sizes(), " but ", ref_name,
                " has shape ", ref.sym_sizes(), "; the leading dimensions must agree");
    TORCH_CHECK(t.sym_size(-1) == last, op, ": the last dimension of ", name, " is ",
                t.sym_size(-1), " but must be ", last, " (P = group_ends[-1], the optimizer "
                "state holds 2P: first moments, then second moments)");
  }
  if (!t.is_meta())
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " is not contiguous (strides ", t.strides(),
                "); pass contiguous tensors");
}

// Distinct tensors must not share memory: the kernels read and write each element once and
// would silently give wrong results on aliased inputs.
using Named = std::pair<const at::Tensor*, const char*>;
void check_no_overlap(const char* op, std::initializer_list<Named> ts) {
  if (ts.begin()->first->is_meta()) return;
  for (auto a = ts.begin(); a != ts.end(); ++a)
    for (auto b = a + 1; b != ts.end(); ++b) {
      const auto s = at::get_overlap_status(*a->first, *b->first);
      TORCH_CHECK(s == at::MemOverlapStatus::No, op, ": ", a->second, " and ", b->second,
                  " share memory; pass separate tensors (e.g. .clone() one of them)");
    }
}

}  // namespace

// Shared with ops_cuda.cu (declared there): validate arguments, throw a readable error.
void check_step_args(const at::Tensor& theta, const at::Tensor& momentum, const at::Tensor& grad,
                     c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                     c10::ArrayRef<double> wds) {
  constexpr const char* op = "fastreplay.sgd_step_";
  check_lists(op, group_ends, lrs, wds);
  const int64_t P = group_ends.back();
  const auto st = theta.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
              ": unsupported dtype ", st, "; use float32, float64, bfloat16 or float16");
  check_tensor(op, theta, "theta", theta, "theta", P);
  check_tensor(op, momentum, "momentum", theta, "theta", P);
  check_tensor(op, grad, "grad", theta, "theta", P);
  check_no_overlap(op, {{&theta, "theta"}, {&momentum, "momentum"}, {&grad, "grad"}});
}

void check_adjoint_args(const at::Tensor& theta_bar, const at::Tensor& m_bar,
                        const at::Tensor& g_bar, const std::optional<at::Tensor>& hvp,
                        c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                        c10::ArrayRef<double> wds) {
  constexpr const char* op = "fastreplay.sgd_adjoint_";
  check_lists(op, group_ends, lrs, wds);
  const int64_t P = group_ends.back();
  const auto st = theta_bar.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": unsupported dtype ", st,
              "; the adjoint runs in float32 or float64");
  check_tensor(op, theta_bar, "theta_bar", theta_bar, "theta_bar", P);
  check_tensor(op, m_bar, "m_bar", theta_bar, "theta_bar", P);
  check_tensor(op, g_bar, "g_bar", theta_bar, "theta_bar", P);
  if (hvp.has_value() && hvp->defined()) {
    check_tensor(op, *hvp, "hvp", theta_bar, "theta_bar", P);
    check_no_overlap(
        op, {{&theta_bar, "theta_bar"}, {&m_bar, "m_bar"}, {&g_bar, "g_bar"}, {&*hvp, "hvp"}});
  } else {
    check_no_overlap(op, {{&theta_bar, "theta_bar"}, {&m_bar, "m_bar"}, {&g_bar, "g_bar"}});
  }
}


void check_adam_step_args(const at::Tensor& theta, const at::Tensor& state, const at::Tensor& grad,
                          c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                          c10::ArrayRef<double> wds) {
  constexpr const char* op = "fastreplay.adam_step_";
  check_lists(op, group_ends, lrs, wds);
  const int64_t P = group_ends.back();
  const auto st = theta.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": unsupported dtype ", st,
              "; use float32 or float64");
  check_adam_tensor(op, theta, "theta", theta, "theta", P, false);
  check_adam_tensor(op, state, "state", theta, "theta", 2 * P, false);
  check_adam_tensor(op, grad, "grad", theta, "theta", P, false);
  check_no_overlap(op, {{&theta, "theta"}, {&state, "state"}, {&grad, "grad"}});
}

void check_adam_adjoint_args(const at::Tensor& theta_bar, const at::Tensor& state_bar,
                             const at::Tensor& g_bar, const std::optional<at::Tensor>& hvp,
                             const at::Tensor& grad, const at::Tensor& theta,
                             const at::Tensor& state, c10::IntArrayRef group_ends,
                             c10::ArrayRef<double> lrs, c10::ArrayRef<double> wds) {
  constexpr const char* op = "fastreplay.adam_adjoint_";
  check_lists(op, group_ends, lrs, wds);
  const int64_t P = group_ends.back();
  const auto st = theta_bar.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, ": unsupported dtype ", st,
              "; the adjoint runs in float32 or float64");
  TORCH_CHECK(theta_bar.dim() == 2, op, ": theta_bar must be (K, P), one row per measurement, "
              "got ", theta_bar.sym_sizes());
  check_adam_tensor(op, theta_bar, "theta_bar", theta_bar, "theta_bar", P, false);
  check_adam_tensor(op, state_bar, "state_bar", theta_bar, "theta_bar", 2 * P, false);
  check_adam_tensor(op, g_bar, "g_bar", theta_bar, "theta_bar", P, false);
  const bool has_hvp = hvp.has_value() && hvp->defined();
  if (has_hvp) check_adam_tensor(op, *hvp, "hvp", theta_bar, "theta_bar", P, false);
  check_adam_tensor(op, grad, "grad", theta_bar, "theta_bar", P, true);
  check_adam_tensor(op, theta, "theta", theta_bar, "theta_bar", P, true);
  check_adam_tensor(op, state, "state", theta_bar, "theta_bar", 2 * P, true);
  if (has_hvp)
    check_no_overlap(op, {{&theta_bar, "theta_bar"}, {&state_bar, "state_bar"},
                          {&g_bar, "g_bar"}, {&*hvp, "hvp"}, {&grad, "grad"}, {&theta, "theta"},
                          {&state, "state"}});
  else
    check_no_overlap(op, {{&theta_bar, "theta_bar"}, {&state_bar, "state_bar"},
                          {&g_bar, "g_bar"}, {&grad, "grad"}, {&theta, "theta"},
                          {&state, "state"}});
}

namespace {

// Calls f(begin, end, group) over [0, numel) in parallel, split into runs of one group each,
// so that the inner loops have constant lr/wd and vectorize.
template <typename T, typename F>
void parallel_group_runs(int64_t numel, int64_t P, const GroupTable<T>& tab, const F& f) {
  at::parallel_for(0, numel, at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end;) {
      const int64_t col = i % P;
      const int g = find_group(tab, col);
      const int64_t stop = std::min(end, i + (tab.ends[g] - col));
      f(i, stop, g);
      i = stop;
    }
  });
}

void sgd_step_cpu(const at::Tensor& theta, const at::Tensor& momentum, const at::Tensor& grad,
                  c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                  c10::ArrayRef<double> wds, double mu, bool nesterov) {
  check_step_args(theta, momentum, grad, group_ends, lrs, wds);
  const int64_t numel = theta.numel(), P = group_ends.back();
  if (numel == 0) return;
  const auto st = theta.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, st, "sgd_step_cpu", [&] {
    using T = at::opmath_type<scalar_t>;  // float for bf16/f16 (store back rounds once)
    const auto tab = make_group_table<T>(group_ends.data(), lrs.data(), wds.data(),
                                         static_cast<int>(group_ends.size()));
    scalar_t* th = theta.mutable_data_ptr<scalar_t>();
    scalar_t* m = momentum.mutable_data_ptr<scalar_t>();
    const scalar_t* gr = grad.const_data_ptr<scalar_t>();
    const T mu_ = static_cast<T>(mu);
    parallel_group_runs(numel, P, tab, [&](int64_t b, int64_t e, int g) {
      const T lr = tab.lr[g], wd = tab.wd[g];
      for (int64_t i = b; i < e; ++i) {
        T t = th[i], mm = m[i];
        sgd_step_elem<T>(t, mm, static_cast<T>(gr[i]), lr, wd, mu_, nesterov);
        th[i] = t;
        m[i] = mm;
      }
    });
  });
}

void sgd_adjoint_cpu(const at::Tensor& theta_bar, const at::Tensor& m_bar, const at::Tensor& g_bar,
                     const std::optional<at::Tensor>& hvp, c10::IntArrayRef group_ends,
                     c10::ArrayRef<double> lrs, c10::ArrayRef<double> wds, double mu,
                     bool nesterov) {
  check_adjoint_args(theta_bar, m_bar, g_bar, hvp, group_ends, lrs, wds);
  const int64_t numel = theta_bar.numel(), P = group_ends.back();
  if (numel == 0) return;
  AT_DISPATCH_FLOATING_TYPES(theta_bar.scalar_type(), "sgd_adjoint_cpu", [&] {
    using T = scalar_t;
    const auto tab = make_group_table<T>(group_ends.data(), lrs.data(), wds.data(),
                                         static_cast<int>(group_ends.size()));
    T* tb = theta_bar.mutable_data_ptr<T>();
    T* mb = m_bar.mutable_data_ptr<T>();
    T* gb = g_bar.mutable_data_ptr<T>();
    const T* hv = (hvp.has_value() && hvp->defined()) ? hvp->const_data_ptr<T>() : nullptr;
    const T mu_ = static_cast<T>(mu);
    parallel_group_runs(numel, P, tab, [&](int64_t b, int64_t e, int g) {
      const T neg_lr = -tab.lr[g], wd = tab.wd[g];
      for (int64_t i = b; i < e; ++i) {
        T t = hv ? tb[i] + hv[i] : tb[i], m = mb[i], g = gb[i];
        sgd_adjoint_elem<T>(t, m, g, neg_lr, wd, mu_, nesterov);
        tb[i] = t;
        mb[i] = m;
        gb[i] = g;
      }
    });
  });
}

// Element i of a (..., P) tensor sits in row i / P at column i % P; that row's moments are at
// row * 2P + column (m) and row * 2P + P + column (v) of the (..., 2P) state.
void adam_step_cpu(const at::Tensor& theta, const at::Tensor& state, const at::Tensor& grad,
                   c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                   c10::ArrayRef<double> wds, double b1, double b2, double eps, double eps_root,
                   double c1, double c2, bool decoupled) {
  check_adam_step_args(theta, state, grad, group_ends, lrs, wds);
  const int64_t numel = theta.numel(), P = group_ends.back();
  if (numel == 0) return;
  AT_DISPATCH_FLOATING_TYPES(theta.scalar_type(), "adam_step_cpu", [&] {
    using T = scalar_t;
    const auto tab = make_group_table<T>(group_ends.data(), lrs.data(), wds.data(),
                                         static_cast<int>(group_ends.size()));
    const auto sc = make_adam_scalars<T>(b1, b2, eps, eps_root, c1, c2, decoupled);
    T* th = theta.mutable_data_ptr<T>();
    T* st = state.mutable_data_ptr<T>();
    const T* gr = grad.const_data_ptr<T>();
    parallel_group_runs(numel, P, tab, [&](int64_t b, int64_t e, int g) {
      const T lr = tab.lr[g], wd = tab.wd[g];
      const int64_t row = b / P, col0 = b % P;
      T* m = st + row * 2 * P + col0 - b;  // m[i], v[i] for i in [b, e)
      T* v = m + P;
      for (int64_t i = b; i < e; ++i) {
        T t = th[i], mm = m[i], vv = v[i];
        adam_step_elem<T>(t, mm, vv, gr[i], lr, wd, sc);
        th[i] = t;
        m[i] = mm;
        v[i] = vv;
      }
    });
  });
}

void adam_adjoint_cpu(const at::Tensor& theta_bar, const at::Tensor& state_bar,
                      const at::Tensor& g_bar, const std::optional<at::Tensor>& hvp,
                      const at::Tensor& grad, const at::Tensor& theta, const at::Tensor& state,
                      c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                      c10::ArrayRef<double> wds, double b1, double b2, double eps,
                      double eps_root, double c1, double c2, bool decoupled) {
  check_adam_adjoint_args(theta_bar, state_bar, g_bar, hvp, grad, theta, state, group_ends, lrs,
                          wds);
  const int64_t numel = theta_bar.numel(), P = group_ends.back();
  if (numel == 0) return;
  AT_DISPATCH_FLOATING_TYPES(theta_bar.scalar_type(), "adam_adjoint_cpu", [&] {
    using T = scalar_t;
    const auto tab = make_group_table<T>(group_ends.data(), lrs.data(), wds.data(),
                                         static_cast<int>(group_ends.size()));
    const auto sc = make_adam_scalars<T>(b1, b2, eps, eps_root, c1, c2, decoupled);
    T* tb = theta_bar.mutable_data_ptr<T>();
    T* sb = state_bar.mutable_data_ptr<T>();
    T* gb = g_bar.mutable_data_ptr<T>();
    const T* hv = (hvp.has_value() && hvp->defined()) ? hvp->const_data_ptr<T>() : nullptr;
    const T* gr = grad.const_data_ptr<T>();
    const T* th = theta.const_data_ptr<T>();
    const T* m = state.const_data_ptr<T>();
    const T* v = m + P;
    parallel_group_runs(numel, P, tab, [&](int64_t b, int64_t e, int g) {
      const T lr = tab.lr[g], wd = tab.wd[g];
      const int64_t row = b / P, col0 = b % P;
      T* mb = sb + row * 2 * P + col0;  // this run's columns col0 .. col0 + (e - b)
      T* vb = mb + P;
      for (int64_t i = b, c = col0; i < e; ++i, ++c) {
        T t = hv ? tb[i] + hv[i] : tb[i], mbar = mb[i - b], vbar = vb[i - b], gbar;
        adam_adjoint_elem<T>(t, mbar, vbar, gbar, gr[c], th[c], m[c], v[c], lr, wd, sc);
        tb[i] = t;
        mb[i - b] = mbar;
        vb[i - b] = vbar;
        gb[i] = gbar;
      }
    });
  });
}

void adam_step_meta(const at::Tensor& theta, const at::Tensor& state, const at::Tensor& grad,
                    c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                    c10::ArrayRef<double> wds, double, double, double, double, double, double,
                    bool) {
  check_adam_step_args(theta, state, grad, group_ends, lrs, wds);
}

void adam_adjoint_meta(const at::Tensor& theta_bar, const at::Tensor& state_bar,
                       const at::Tensor& g_bar, const std::optional<at::Tensor>& hvp,
                       const at::Tensor& grad, const at::Tensor& theta, const at::Tensor& state,
                       c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                       c10::ArrayRef<double> wds, double, double, double, double, double,
                       double, bool) {
  check_adam_adjoint_args(theta_bar, state_bar, g_bar, hvp, grad, theta, state, group_ends, lrs,
                          wds);
}

// Meta (fake tensor / torch.compile): the ops mutate in place and return nothing, so only check.
void sgd_step_meta(const at::Tensor& theta, const at::Tensor& momentum, const at::Tensor& grad,
                   c10::IntArrayRef group_ends, c10::ArrayRef<double> lrs,
                   c10::ArrayRef<double> wds, double, bool) {
  check_step_args(theta, momentum, grad, group_ends, lrs, wds);
}

void sgd_adjoint_meta(const at::Tensor& theta_bar, const at::Tensor& m_bar, const at::Tensor& g_bar,
                      const std::optional<at::Tensor>& hvp, c10::IntArrayRef group_ends,
                      c10::ArrayRef<double> lrs, c10::ArrayRef<double> wds, double, bool) {
  check_adjoint_args(theta_bar, m_bar, g_bar, hvp, group_ends, lrs, wds);
}

// FASTREPLAY_WITH_CUDA is defined by setup.py / CMakeLists.txt when ops_cuda.cu is compiled in.
bool built_with_cuda() {
#ifdef FASTREPLAY_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace fastreplay

TORCH_LIBRARY(fastreplay, m) {
  m.def("sgd_step_(Tensor(a!) theta, Tensor(b!) momentum, Tensor grad, int[] group_ends, "
        "float[] lrs, float[] wds, float mu, bool nesterov) -> ()");
  m.def("sgd_adjoint_(Tensor(a!) theta_bar, Tensor(b!) m_bar, Tensor(c!) g_bar, Tensor? hvp, "
        "int[] group_ends, float[] lrs, float[] wds, float mu, bool nesterov) -> ()");
  m.def("adam_step_(Tensor(a!) theta, Tensor(b!) state, Tensor grad, int[] group_ends, "
        "float[] lrs, float[] wds, float beta1, float beta2, float eps, float eps_root, "
        "float c1, float c2, bool decoupled) -> ()");
  m.def("adam_adjoint_(Tensor(a!) theta_bar, Tensor(b!) state_bar, Tensor(c!) g_bar, "
        "Tensor? hvp, Tensor grad, Tensor theta, Tensor state, int[] group_ends, float[] lrs, "
        "float[] wds, float beta1, float beta2, float eps, float eps_root, float c1, float c2, "
        "bool decoupled) -> ()");
  // No tensor arguments: registered as a catch-all (CompositeImplicitAutograd) kernel.
  m.def("built_with_cuda() -> bool", &fastreplay::built_with_cuda);
}

TORCH_LIBRARY_IMPL(fastreplay, CPU, m) {
  m.impl("sgd_step_", &fastreplay::sgd_step_cpu);
  m.impl("sgd_adjoint_", &fastreplay::sgd_adjoint_cpu);
  m.impl("adam_step_", &fastreplay::adam_step_cpu);
  m.impl("adam_adjoint_", &fastreplay::adam_adjoint_cpu);
}

TORCH_LIBRARY_IMPL(fastreplay, Meta, m) {
  m.impl("sgd_step_", &fastreplay::sgd_step_meta);
  m.impl("sgd_adjoint_", &fastreplay::sgd_adjoint_meta);
  m.impl("adam_step_", &fastreplay::adam_step_meta);
  m.impl("adam_adjoint_", &fastreplay::adam_adjoint_meta);
}
