// C++ test of the fastreplay ops through the dispatcher (registered by the linked fastreplay_ops
// library), against a plain scalar loop in double. Exit status 0 = pass. Run by ctest.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok) {
    ++failures;
    std::fprintf(stderr, "FAIL: %s\n", what.c_str());
  }
}

using StepFn = void(const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
                    c10::ArrayRef<double>, c10::ArrayRef<double>, double, bool);
using AdjointFn = void(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                       const std::optional<at::Tensor>&, c10::IntArrayRef, c10::ArrayRef<double>,
                       c10::ArrayRef<double>, double, bool);

struct Groups {
  std::vector<int64_t> ends;
  std::vector<double> lrs, wds;
  int group_of(int64_t col) const {
    int g = 0;
    while (col >= ends[g]) ++g;
    return g;
  }
};

// max |a - b| / (atol + rtol |b|) over all elements; <= 1 passes.
double err_ratio(const at::Tensor& a, const std::vector<double>& b, double tol) {
  auto ad = a.to(at::kCPU, at::kDouble).contiguous();
  const double* p = ad.const_data_ptr<double>();
  double worst = 0;
  for (size_t i = 0; i < b.size(); ++i)
    worst = std::max(worst, std::abs(p[i] - b[i]) / (tol + tol * std::abs(b[i])));
  return worst;
}

std::vector<double> to_vec(const at::Tensor& t) {
  auto d = t.to(at::kCPU, at::kDouble).contiguous();
  return std::vector<double>(d.const_data_ptr<double>(), d.const_data_ptr<double>() + d.numel());
}

void test_step(const c10::TypedOperatorHandle<StepFn>& op, at::Device dev, at::ScalarType dt,
               int64_t P, const Groups& G, double mu, bool nesterov, double tol) {
  auto opts = at::TensorOptions().dtype(dt).device(dev);
  auto th = at::randn({P}, opts), m = at::randn({P}, opts), gr = at::randn({P}, opts);
  auto t = to_vec(th), mm = to_vec(m), g = to_vec(gr);
  op.call(th, m, gr, G.ends, G.lrs, G.wds, mu, nesterov);
  for (int64_t i = 0; i < P; ++i) {  // optim.sgd_step_reference, element by element, in double
    const int k = G.group_of(i);
    const double gi = g[i] + G.wds[k] * t[i];
    mm[i] = mu * mm[i] + gi;
    const double d = nesterov ? gi + mu * mm[i] : mm[i];
    t[i] -= G.lrs[k] * d;
  }
  const std::string tag = std::string("sgd_step_ ") + c10::toString(dt) + " " + dev.str() +
                          " P=" + std::to_string(P) + " nesterov=" + std::to_string(nesterov);
  expect(err_ratio(th, t, tol) <= 1, tag + " theta");
  expect(err_ratio(m, mm, tol) <= 1, tag + " momentum");
}

void test_adjoint(const c10::TypedOperatorHandle<AdjointFn>& op, at::Device dev,
                  at::ScalarType dt, int64_t K, int64_t P, const Groups& G, double mu,
                  bool nesterov, bool with_hvp, double tol) {
  auto opts = at::TensorOptions().dtype(dt).device(dev);
  auto tb = at::randn({K, P}, opts), mb = at::randn({K, P}, opts), gb = at::randn({K, P}, opts);
  std::optional<at::Tensor> hvp;
  if (with_hvp) hvp = at::randn({K, P}, opts);
  auto t = to_vec(tb), m = to_vec(mb), g = std::vector<double>(K * P);
  auto h = with_hvp ? to_vec(*hvp) : std::vector<double>(K * P, 0.0);
  op.call(tb, mb, gb, hvp, G.ends, G.lrs, G.wds, mu, nesterov);
  for (int64_t i = 0; i < K * P; ++i) {  // optim.sgd_adjoint_reference, element by element
    const int k = G.group_of(i % P);
    t[i] += h[i];
    const double d_bar = -G.lrs[k] * t[i];
    const double m_tilde = nesterov ? m[i] + mu * d_bar : m[i] + d_bar;
    g[i] = nesterov ? d_bar + m_tilde : m_tilde;
    m[i] = mu * m_tilde;
    t[i] += G.wds[k] * g[i];
  }
  const std::string tag = std::string("sgd_adjoint_ ") + c10::toString(dt) + " " + dev.str() +
                          " K=" + std::to_string(K) + " P=" + std::to_string(P) +
                          " nesterov=" + std::to_string(nesterov) + " hvp=" +
                          std::to_string(with_hvp);
  expect(err_ratio(tb, t, tol) <= 1, tag + " theta_bar");
  expect(err_ratio(mb, m, tol) <= 1, tag + " m_bar");
  expect(err_ratio(gb, g, tol) <= 1, tag + " g_bar");
}

}  // namespace

int main() {
  auto& dispatcher = c10::Dispatcher::singleton();
  const auto step = dispatcher.findSchemaOrThrow("fastreplay::sgd_step_", "").typed<StepFn>();
  const auto adjoint =
      dispatcher.findSchemaOrThrow("fastreplay::sgd_adjoint_", "").typed<AdjointFn>();
  const bool with_cuda =
      dispatcher.findSchemaOrThrow("fastreplay::built_with_cuda", "").typed<bool()>().call();
  std::printf("built_with_cuda=%d\n", with_cuda);

  at::manual_seed(0);
  std::vector<at::Device> devices{at::kCPU};
  if (with_cuda && at::hasCUDA()) devices.emplace_back(at::kCUDA);
  // double: same formula as the loop (up to FMA contraction); float: float vs double rounding.
  const std::pair<at::ScalarType, double> dtypes[] = {{at::kDouble, 1e-13}, {at::kFloat, 1e-5}};
  for (const auto& dev : devices)
    for (const auto& [dt, tol] : dtypes)
      for (int64_t P : {1, 7, 1023, 100003})
        for (bool nesterov : {false, true}) {
          // the middle group is empty; group 1 has wd 0
          Groups G{{P / 3, P / 3, P}, {0.1, 0.05, 0.3}, {1e-3, 0.0, 5e-2}};
          test_step(step, dev, dt, P, G, 0.9, nesterov, tol);
          for (bool hvp : {false, true})
            test_adjoint(adjoint, dev, dt, 3, P, G, 0.9, nesterov, hvp, tol);
        }

  // A readable error for a bad argument (mismatched dtype).
  bool threw = false;
  try {
    auto a = at::randn({4}), b = at::randn({4}, at::kDouble), c = at::randn({4});
    step.call(a, b, c, std::vector<int64_t>{4}, std::vector<double>{0.1},
              std::vector<double>{0.0}, 0.9, false);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("same dtype") != std::string::npos;
  }
  expect(threw, "mismatched dtype raises a readable c10::Error");
  threw = false;  // a message that formats numbers (and an int list): must not crash
  try {
    auto a = at::randn({4}), b = at::randn({4}), c = at::randn({4});
    step.call(a, b, c, std::vector<int64_t>{2, 4}, std::vector<double>{0.1},
              std::vector<double>{0.0, 0.0}, 0.9, false);
  } catch (const c10::Error& e) {
    threw = std::string(e.what()).find("len(lrs)=1 but len(group_ends)=2") != std::string::npos;
  }
  expect(threw, "len(lrs) != len(group_ends) raises a readable c10::Error");

  std::printf(failures ? "%d FAILURES\n" : "all passed\n", failures);
  return failures ? 1 : 0;
}
